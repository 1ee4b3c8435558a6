"""Several servers behind nginx (Debian's, deploy/nginx.conf), TLS at nginx, on 127.0.0.1: 8 clients, then one
server killed: its clients' sessions are rebuilt on the other with identical masks, the others never notice."""

from pathlib import Path

import numpy as np
import pytest
import torch
from server_fixtures import self_signed, tiny_checkpoint, volume

from MemorizingSAMLib.checkpoints import load_model
from MemorizingSAMLib.client import RemoteSession
from MemorizingSAMLib.server_process import NginxProcess, ServerProcess, find_nginx, free_port
from MemorizingSAMLib.session import InteractiveSession

ROOT = Path(__file__).resolve().parent.parent
SPACING = (1.1, 0.9, 2.0)


def clicks(seed, n):
    rng = np.random.default_rng(100 + seed)
    ijk = [(float(rng.integers(16, 38)), float(rng.integers(14, 34)), float(rng.integers(7, 17))) for _ in range(n)]
    return [(p, i % 3 != 2) for i, p in enumerate(ijk)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("m"))


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    return self_signed(tmp_path_factory.mktemp("tls"))


def local_masks(ckpt, seed, steps):
    s = InteractiveSession(load_model(ckpt).prepare_for_inference())
    s.set_image(volume(seed), spacing=SPACING)
    s.add_segment()
    for ijk, inc in steps:
        s.add_point(ijk, inc)
    return s.mask().copy()


def test_eight_clients_two_servers_one_killed(ckpt, tls, tmp_path):
    assert find_nginx(), "no nginx: `make test` unpacks Debian's into .venv"
    cert, key = tls
    threads = str(torch.get_num_threads())  # masks are compared byte for byte with in-process ones
    servers = [
        ServerProcess(["--model", ckpt, "--device", "cpu", "--threads", threads, "--max-sessions", "32"]).start()
        for _ in range(2)
    ]
    nginx = NginxProcess(ROOT / "deploy" / "nginx.conf", [s.port for s in servers], free_port(), cert, key)
    try:
        nginx.start()
        clients, seeds = [], []
        while len(clients) < 8 or min(RemoteSession(s.url).info()["sessions"] for s in servers) == 0:
            seed = len(clients)
            c = RemoteSession(nginx.url, ca_file=cert)
            c.set_image(volume(seed), spacing=SPACING)
            c.add_segment()
            for ijk, inc in clicks(seed, 3):
                c.add_point(ijk, inc)
            clients.append(c)
            seeds.append(seed)
            assert len(clients) <= 20
        counts = [RemoteSession(s.url).info()["sessions"] for s in servers]
        assert sum(counts) == len(clients) and min(counts) > 0  # spread over both by the session id's hash
        assert all(c.recoveries == 0 for c in clients)  # every request found its session: routed by its id
        before = [c.mask().copy() for c in clients]

        servers[0].kill()  # as a crash: nothing saved, nothing said
        for c in clients:
            c.set_prompts(list(c.placed()))  # the same prompts: a no-op where the session lives
        moved = [c for c in clients if c.recoveries]
        stayed = [c for c in clients if not c.recoveries]
        assert len(moved) == counts[0] and len(stayed) == counts[1]
        for c, b in zip(clients, before):
            assert np.array_equal(c.mask(), b)  # rebuilt masks identical; the others untouched
        assert RemoteSession(servers[1].url).info()["sessions"] == len(clients)

        # and every client goes on clicking, with the masks an in-process session gives for the same clicks
        for c, seed in zip(clients, seeds):
            more = clicks(seed, 5)
            for ijk, inc in more[3:]:
                c.add_point(ijk, inc)
            assert np.array_equal(c.mask(), local_masks(ckpt, seed, more))
        assert all(c.recoveries == 1 for c in moved) and all(c.recoveries == 0 for c in stayed)
    finally:
        nginx.stop()
        for s in servers:
            s.stop()
