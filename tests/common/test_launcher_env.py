"""A plain one-process run gets launcher variables of its own; children of the test suite start clean."""

import os
import socket

from megatron_gem.common.distributed import LAUNCHER_ENV, ensure_launcher_env
from tests.launch import subprocess_env


def test_one_process_run_rendezvous_on_a_port_no_one_holds(monkeypatch):
    for key in LAUNCHER_ENV:
        monkeypatch.delenv(key, raising=False)
    with socket.socket() as held:  # another one-process job on the host holds a port
        held.bind(("127.0.0.1", 0))
        held.listen()
        ensure_launcher_env()
        port = int(os.environ["MASTER_PORT"])
        assert port != held.getsockname()[1]
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # free: binding succeeds
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("0", "1", "0")


def test_a_launcher_port_is_kept(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_PORT", "31111")
    ensure_launcher_env()
    assert os.environ["MASTER_PORT"] == "31111"


def test_children_do_not_inherit_an_in_process_run_s_launcher_variables(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_PORT", "29517")
    env = subprocess_env(EXTRA="1")
    assert not set(LAUNCHER_ENV) & set(env) and env["EXTRA"] == "1"


def test_conftest_lists_the_launcher_variables():
    from tests import conftest

    assert conftest._LAUNCHER_ENV == LAUNCHER_ENV
