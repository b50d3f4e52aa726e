"""The project's sbatch scripts against a real SLURM (slurmctld + two slurmd + munge).

tools/slurm_local.sh stands the cluster up on localhost (installing the Debian packages when
missing) and tears it down after. Every job is the production launcher, slurm/gem_llama8b.sh,
unchanged: the allocation is shrunk on the sbatch command line (as users do) and the tiny CPU
configuration comes from environment overrides. What is checked:

1. a fresh run trains with 2 nodes x 2 ranks (world size 4, each rank on the node SLURM put
   it on), writes metrics.jsonl and a checkpoint;
2. a second submission with the same SAVE resumes from that checkpoint; the pre-emption
   signal (what --signal=B:USR1@lead sends to the batch shell) makes the ranks save and the
   job requeue itself, and the requeued run resumes from the new checkpoint and finishes;
3. BACKEND=megatron (megatron-core, TP=2 x DP=2) starts and trains the same way, and a rank
   that dies fails the whole job promptly (no hang, no requeue, no stray ranks);
4. a bad configuration fails before anything starts, with the reason in the log.

Skipped, with the reason, only where the cluster cannot be set up at all (not root, or apt
cannot install slurm/munge): tools/slurm_local.sh exits 3 for exactly those cases.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SETUP = ROOT / "tools" / "slurm_local.sh"
SCRIPT = ROOT / "slurm" / "gem_llama8b.sh"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
# The allocation override: the header asks for 2 nodes x 8 GPUs x 64 CPUs for 24 h.
SBATCH_ARGS = ["--nodes=2", "--cpus-per-task=2", "--time=30"]
JOB_TIMEOUT = 180
COLLECTIVE_TIMEOUT_S = 300  # --distributed-timeout-minutes of the dead-rank job
# Steps of the fresh run + resubmission: enough that the pre-emption signal, sent once the
# resubmission has trained a step, lands well before the end.
ITERS = 16


def _free_port_block(n: int) -> int:
    """A port p with p .. p+n-1 all free (slurmctld, then one slurmd per node)."""
    for base in range(26817, 30000, 17):
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                s.bind(("127.0.0.1", p))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port block")


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        pytest.skip("needs root: tools/slurm_local.sh installs slurm/munge with apt and runs slurmd as root")
    state = tempfile.mkdtemp(prefix="gem-slurm-", dir="/tmp")
    os.chmod(state, 0o755)  # munged (user munge) must reach its socket and key below it
    env = dict(os.environ, GEM_SLURM_PORT=str(_free_port_block(3)), GEM_SLURM_NODES="2", GEM_SLURM_CPUS="2")
    up = subprocess.run(["bash", str(SETUP), "up", state], env=env, capture_output=True, text=True, timeout=900)
    try:
        if up.returncode == 3:
            pytest.skip(f"cannot host a local SLURM here: {up.stderr.strip().splitlines()[-1]}")
        assert up.returncode == 0, f"tools/slurm_local.sh up failed:\n{up.stdout}\n{up.stderr}"
        env["SLURM_CONF"] = f"{state}/slurm.conf"
        yield {"env": env, "dir": state}
    finally:
        started = {p.stem: int(p.read_text()) for p in Path(state, "pid").glob("*.pid")}
        down = subprocess.run(["bash", str(SETUP), "down", state], env=env, capture_output=True, text=True, timeout=120)
        assert down.returncode == 0, f"tools/slurm_local.sh down failed:\n{down.stderr}"
        for name, pid in started.items():
            alive = os.path.exists(f"/proc/{pid}") and Path(f"/proc/{pid}/comm").read_text().strip() == name.split(".")[0]
            assert not alive, f"{name} (pid {pid}) still runs after down"
        assert state not in Path("/etc/hosts").read_text(), "down left its /etc/hosts line"
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from megatron_gem.testing import sample_sentences, save_tiny_checkpoint

    d = tmp_path_factory.mktemp("slurm_jobs")
    save_tiny_checkpoint(d / "model")
    with open(d / "data.jsonl", "w") as f:
        for s in sample_sentences(400):
            f.write(json.dumps({"text": s}) + "\n")
    return d


def job_env(cluster, workdir, save, **overrides) -> dict:
    env = dict(cluster["env"])
    for key in list(env):  # a test run inside a SLURM job must not leak that job's settings
        if key.startswith(("SLURM_", "SBATCH_")) and key != "SLURM_CONF":
            del env[key]
    env.update(
        GPUS_PER_NODE="0",  # CPU/gloo mode, although the header asks SLURM for 8 GPUs per node
        RANKS_PER_NODE="2",
        PYTHON=sys.executable,
        MODEL=str(workdir / "model"),
        DATA=str(workdir / "data.jsonl"),
        SAVE=str(save),
        SEQ_LENGTH="128",
        MICRO_BATCH_SIZE="1",
        GLOBAL_BATCH_SIZE="4",
        CONTRASTIVE_FROM_STEP="3",
        SAVE_INTERVAL="100",
        LOG_INTERVAL="1",
        GRADIENT_CHECKPOINTING="0",
    )
    env.update(overrides)
    return env


def submit(env, workdir) -> str:
    out = subprocess.run(["sbatch", "--parsable", *SBATCH_ARGS, str(SCRIPT)], env=env, cwd=workdir, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"sbatch failed: {out.stderr}"
    return out.stdout.strip().split(";")[0]


def job_info(env, job_id) -> dict:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=env, capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        return {}
    return dict(field.split("=", 1) for field in out.stdout.split() if "=" in field)


def job_processes(cluster, job_id) -> dict[int, tuple[str, dict, int]]:
    """Every process of one of this cluster's jobs on this host: pid -> (command line, env, parent pid)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        env = dict(e.decode(errors="replace").split("=", 1) for e in raw if b"=" in e)
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # after "(comm)": state, ppid, ...
        if env.get("SLURM_CONF") == cluster["env"]["SLURM_CONF"] and env.get("SLURM_JOB_ID") == job_id:
            found[int(pid)] = (cmd, env, ppid)
    return found


def rank_processes(cluster, job_id) -> dict[int, dict]:
    """The training ranks of a job: the direct children of torchrun's agents (not the agents, and
    not what a rank forks, e.g. a compile or loader helper that inherits its environment):
    pid -> SLURM's node name and torchrun's RANK, WORLD_SIZE, LOCAL_RANK."""
    procs = job_processes(cluster, job_id)
    agents = {pid for pid, (cmd, _, _) in procs.items() if "torch.distributed.run" in cmd}
    return {
        pid: {k: env[k] for k in ("SLURMD_NODENAME", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
        for pid, (cmd, env, ppid) in procs.items()
        if "RANK" in env and ppid in agents and pid not in agents
    }


def wait_job(env, job_id, timeout=JOB_TIMEOUT, on_poll=None) -> dict:
    """Poll until the job reaches a final state; ``on_poll(info)`` runs on every poll."""
    deadline = time.monotonic() + timeout
    last = {}
    while time.monotonic() < deadline:
        info = job_info(env, job_id)
        if info:
            last = info
            if on_poll is not None:
                on_poll(info)
            if info.get("JobState") in TERMINAL:
                return info
        elif last:  # purged (MinJobAge) right after finishing: the last state we saw stands
            return last
        time.sleep(0.25)
    subprocess.run(["scancel", job_id], env=env, timeout=30)
    raise AssertionError(f"job {job_id} did not finish within {timeout} s; last seen: {last.get('JobState')}")


def job_log(workdir, job_id, ext="out") -> str:
    path = workdir / f"gem-llama8b-{job_id}.{ext}"
    return path.read_text() if path.exists() else ""


def metrics(save) -> list[dict]:
    """The complete lines of metrics.jsonl (read while rank 0 may be appending to it)."""
    path = Path(save) / "metrics.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.exists() else []
    return [json.loads(line) for line in lines if line.strip()]


def describe(workdir, job_id) -> str:
    err = job_log(workdir, job_id, "err").splitlines()
    err = [line for line in err if "FutureWarning" not in line and "return func(" not in line]
    return f"--- out\n{job_log(workdir, job_id)}\n--- err (filtered, last 40 lines)\n" + "\n".join(err[-40:])


def test_setup_is_idempotent(cluster):
    pids = {p.name: p.read_text() for p in Path(cluster["dir"], "pid").glob("*.pid")}
    assert set(pids) == {"munged.pid", "slurmctld.pid", "slurmd.node1.pid", "slurmd.node2.pid"}, pids
    again = subprocess.run(["bash", str(SETUP), "up", cluster["dir"]], env=cluster["env"], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "starting" not in again.stderr, again.stderr  # nothing (re)started
    assert {p.name: p.read_text() for p in Path(cluster["dir"], "pid").glob("*.pid")} == pids


# ---- 1 + 2: fresh run, then a resubmission that resumes, is pre-empted, requeues, finishes -------


@pytest.fixture(scope="module")
def fresh_run(cluster, workdir):
    save = workdir / "run"
    env = job_env(cluster, workdir, save, TRAIN_ITERS=str(ITERS), TRAIN_ARGS="--exit-after-iters 2")
    job_id = submit(env, workdir)
    seen: dict[int, dict] = {}
    info = wait_job(cluster["env"], job_id, on_poll=lambda _: seen.update(rank_processes(cluster, job_id)))
    return {"job": job_id, "info": info, "ranks": seen, "save": save, "env": env, "cluster": cluster}


def test_fresh_run_trains_two_nodes_by_two_ranks(fresh_run, workdir):
    job, info, save = fresh_run["job"], fresh_run["info"], fresh_run["save"]
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", describe(workdir, job)
    out = job_log(workdir, job)
    assert "nodes 2 x ranks 2 = world size 4; device cpu (gloo)" in out, out
    assert "resume none (fresh start)" in out
    assert "dp=4" in out, out  # train.py's own view of the data-parallel world

    # Which processes really ran where: read from the ranks' environment while they lived.
    placement = sorted((p["RANK"], p["SLURMD_NODENAME"], p["WORLD_SIZE"]) for p in fresh_run["ranks"].values())
    assert placement == [("0", "node1", "4"), ("1", "node1", "4"), ("2", "node2", "4"), ("3", "node2", "4")], placement

    steps = metrics(save)
    assert [m["step"] for m in steps] == [1, 2], steps
    assert all(0 < m["loss"] < 20 for m in steps), steps
    assert (save / "latest").read_text().strip() == "global_step2"
    for rank in range(4):
        assert (save / "global_step2" / f"rng_state_rank{rank}.pt").is_file()
    assert not job_processes(fresh_run["cluster"], job), "processes of the finished job are still running"


def test_resubmission_resumes_and_preemption_requeues(fresh_run, cluster, workdir):
    save = fresh_run["save"]
    assert (save / "latest").is_file(), "needs the fresh run's checkpoint"
    before = metrics(save)
    env = dict(fresh_run["env"], TRAIN_ARGS="")  # same run, no early stop: train to the end
    job = submit(env, workdir)
    signalled = {}

    def preempt_once_training(info):
        # As soon as this submission has trained a step of its own, do what SLURM does at
        # --signal=B:USR1@lead: signal the batch shell (only it, not the steps).
        if not signalled and info.get("JobState") == "RUNNING" and any(m["step"] > 2 for m in metrics(save)):
            subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=cluster["env"], check=True, timeout=30)
            signalled["at_step"] = max(m["step"] for m in metrics(save))

    info = wait_job(cluster["env"], job, on_poll=preempt_once_training)
    out = job_log(workdir, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", describe(workdir, job)
    assert signalled, "the job finished before it could be signalled"

    # First run of this job: resumed from the fresh run's checkpoint, saved on the signal.
    first, _, second = out.partition("restart 1 on")
    assert "restart 0" in first and f"resume from {save}/global_step2" in first, out
    assert f"steps 2->{ITERS}" in first, out
    saved = [line for line in first.splitlines() if "SIGUSR1: saved step" in line]
    assert saved, f"no save on SIGUSR1:\n{out}"
    k = int(saved[0].split("saved step ")[1].split()[0])
    assert 3 <= k < ITERS, k
    assert f"requeueing job {job}" in first
    # The requeued run (same job, Restarts=1) resumed from that save and finished.
    assert info["Restarts"] == "1", info
    assert f"resume from {save}/global_step{k}" in second and f"steps {k}->{ITERS}" in second, out
    assert f"'preempted': False, 'step': {ITERS}" in second, out

    steps = metrics(save)
    assert [m["step"] for m in steps] == list(range(1, ITERS + 1)), [m["step"] for m in steps]
    assert steps[:2] == before, "the fresh run's metrics were rewritten: the resubmission restarted"
    assert (save / "latest").read_text().strip() == f"global_step{ITERS}"
    assert (save / f"global_step{k}").is_dir() and (save / "hf" / "config.json").is_file()


# ---- 3: the megatron-core backend starts the same way; a dead rank fails the job promptly -------


def test_megatron_backend_trains_and_a_dead_rank_fails_the_job(cluster, workdir):
    save = workdir / "megatron"
    env = job_env(
        cluster, workdir, save, BACKEND="megatron", TP="2", PP="1", SEQ_LENGTH="64", TRAIN_ITERS="100000",
        TRAIN_ARGS="--contrastive-batch-size 4 --contrastive-max-length 24 --attention-backend sdpa",
        DISTRIBUTED_TIMEOUT_MINUTES=str(COLLECTIVE_TIMEOUT_S // 60),
    )  # fmt: skip
    job = submit(env, workdir)
    seen: dict[int, dict] = {}
    killed = {}

    def kill_one_rank(info):
        if killed or info.get("JobState") != "RUNNING":
            return
        seen.update(rank_processes(cluster, job))
        if not metrics(save):  # wait until it trains
            return
        victim = [pid for pid, e in rank_processes(cluster, job).items() if e["RANK"] == "3"]
        if victim:
            # Rank 3 (on node2) crashes: it and any helper process it started (its process
            # group). A lone SIGKILL would orphan its helpers, which proctrack/linuxproc here
            # (unlike proctrack/cgroup on real clusters) no longer tracks.
            os.killpg(os.getpgid(victim[0]), signal.SIGKILL)
            killed.update(pid=victim[0], at=time.monotonic())

    info = wait_job(cluster["env"], job, on_poll=kill_one_rank)
    out, err = job_log(workdir, job), job_log(workdir, job, "err")
    assert killed, f"rank 3 was never seen training\n{describe(workdir, job)}"
    assert "backend megatron (tp=2 pp=1)" in out and "world size 4" in out, out
    placement = sorted((p["RANK"], p["SLURMD_NODENAME"], p["WORLD_SIZE"]) for p in seen.values())
    assert placement == [("0", "node1", "4"), ("1", "node1", "4"), ("2", "node2", "4"), ("3", "node2", "4")], placement
    assert metrics(save)[0]["step"] == 1

    elapsed = time.monotonic() - killed["at"]
    assert info["JobState"] == "FAILED", describe(workdir, job)
    assert info["ExitCode"] != "0:0" and info["Restarts"] == "0", info
    # The behaviour under test: srun --kill-on-bad-exit ends the job when a rank dies, instead
    # of the survivors waiting in a collective until its timeout fires. So the bound is that
    # timeout (set for this job), not a guess at how fast this machine is.
    assert elapsed < COLLECTIVE_TIMEOUT_S, f"the job took {elapsed:.0f} s to fail after a rank died (collective timeout {COLLECTIVE_TIMEOUT_S} s)"
    assert not job_processes(cluster, job), "processes of the failed job are still running"
    assert "training failed (exit" in out, describe(workdir, job)
    assert "ChildFailedError" in err or "FAILED" in err, describe(workdir, job)


# ---- 4: a bad configuration fails at once -------------------------------------------------------


def test_bad_configuration_fails_before_launch(cluster, workdir):
    env = job_env(cluster, workdir, workdir / "never", TRAIN_ITERS="10", NODES="3")
    job = submit(env, workdir)
    info = wait_job(cluster["env"], job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", info
    assert "NODES=3 but the job has 2 node(s)" in job_log(workdir, job, "err")
    assert not (workdir / "never").exists()
