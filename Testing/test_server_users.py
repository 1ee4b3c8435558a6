"""Many users on one server (real `memsam serve` processes on 127.0.0.1): sessions kept apart, quotas, a users
file re-read while serving, TLS, and saturation answered with 503 + Retry-After."""

import http.client
import json
import threading
import time

import pytest
from server_fixtures import self_signed, tiny_checkpoint, volume

from MemorizingSAMLib.client import RemoteError, RemoteSession
from MemorizingSAMLib.server_process import ServerProcess
from MemorizingSAMLib.users import add_user, parse_users


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("m"))


def session(url, token, **kw):
    s = RemoteSession(url, token, **kw)
    s.set_image(volume(), spacing=(1.1, 0.9, 2.0))
    s.add_segment()
    return s


def raw(url, method, path, token, body=None):
    host, port = url.split("//")[1].split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=30)
    c.request(method, path, body=body, headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    r = c.getresponse()
    out = r.status, r.getheader("Retry-After"), r.read()
    c.close()
    return out


def test_users_are_kept_apart_and_cannot_evict_each_other(ckpt, tmp_path):
    users = tmp_path / "users.txt"
    alice = add_user(users, "alice", max_sessions=2)
    bob = add_user(users, "bob")
    assert set(parse_users(users.read_text())) == {"alice", "bob"} and alice not in users.read_text()
    args = ["--model", ckpt, "--users-file", users, "--device", "cpu", "--max-sessions", "3"]
    with ServerProcess(args) as server:
        a1 = session(server.url, alice)
        a1.add_point((30, 24, 12))
        b1 = session(server.url, bob)
        # bob holds alice's session id: it does not exist for him, whatever he asks
        for method, path, body in [
            ("POST", f"/sessions/{a1.sid}/segments/1/points", b'{"ijk": [30, 24, 12]}'),
            ("POST", f"/sessions/{a1.sid}/segments/1/undo", b"{}"),
            ("POST", f"/sessions/{a1.sid}/segments", b"{}"),
            ("DELETE", f"/sessions/{a1.sid}", None),
        ]:
            status, _, text = raw(server.url, method, path, bob, body)
            assert status == 404 and b"no session" in text, (path, status, text)
        a1.add_point((32, 26, 12))  # still alice's, untouched
        assert len(a1.placed()) == 2
        # alice's quota (2): her third session evicts her own oldest, never bob's
        a2 = session(server.url, alice)
        a3 = session(server.url, alice)
        status, _, _ = raw(server.url, "POST", f"/sessions/{a1.sid}/segments", alice, b"{}")
        assert status == 404
        b1.add_point((30, 24, 12))
        # the server is full (3): bob's next session is refused, alice's are not evicted for it
        with pytest.raises(RemoteError) as e:
            session(server.url, bob, busy_wait_s=0)
        assert e.value.status == 503 and "maximum of 3 sessions" in str(e.value)
        for s in (a2, a3):
            s.add_point((30, 24, 12))
        # the users file is re-read while serving: carol joins, bob leaves
        carol = add_user(users, "carol")
        users.write_text("\n".join(x for x in users.read_text().splitlines() if not x.startswith("bob")) + "\n")
        assert RemoteSession(server.url, carol).info()["model"]
        with pytest.raises(RemoteError) as e:
            b1.add_point((31, 24, 12))
        assert e.value.status == 401
        assert all(tok not in server.errors() for tok in (alice, bob, carol))  # never logged


def test_tls_with_a_trusted_certificate_and_refused_otherwise(ckpt, tmp_path, memsam):
    cert, key = self_signed(tmp_path, "server")
    other, _ = self_signed(tmp_path, "other")
    token = "tls-test-token-0123456789"
    (tmp_path / "token").write_text(token)
    args = ["--model", ckpt, "--token-file", tmp_path / "token", "--tls-cert", cert, "--tls-key", key]
    with ServerProcess(args) as server:
        assert server.url.startswith("https://")
        s = session(server.url, token, ca_file=cert)
        s.add_point((30, 24, 12))
        assert s.mask().sum() > 0
        for ca in (None, other):  # the system store does not know it; another certificate is not it
            with pytest.raises(RemoteError) as e:
                RemoteSession(server.url, token, ca_file=ca).info()
            assert "TLS failed" in str(e.value) and "certificate" in str(e.value)
    r = memsam("serve", "--model", ckpt, "--host", "0.0.0.0", "--port", "1")
    assert r.returncode == 1 and "plain HTTP" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_a_saturated_server_says_so_and_the_client_waits(ckpt, tmp_path):
    args = ["--model", ckpt, "--device", "cpu", "--max-wait", "0.001", "--threads", "1"]
    with ServerProcess(args) as server:
        clients = [session(server.url, None) for _ in range(4)]
        clients[0].add_point((30, 24, 12))  # the server now knows its service time
        info = clients[0].info()
        assert info["queue"] == 0 and info["service_ms"] > 0

        answers = []

        def click(c, n):
            host, port = server.url.split("//")[1].split(":")
            conn = http.client.HTTPConnection(host, int(port), timeout=60)
            body = json.dumps({"ijk": [28 + n, 24, 12]})
            conn.request("POST", f"/sessions/{c.sid}/segments/1/points", body, {"Content-Type": "application/json"})
            r = conn.getresponse()
            answers.append((r.status, r.getheader("Retry-After"), r.read()))

        threads = [threading.Thread(target=click, args=(c, n)) for n, c in enumerate(clients) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        busy = [a for a in answers if a[0] == 503]
        assert busy and all(a[1] and int(a[1]) >= 1 and b"saturated" in a[2] for a in busy)
        assert any(a[0] == 200 for a in answers)

        # RemoteSession waits as told and gets through
        done = []
        t0 = time.monotonic()

        def refine(c, n):
            c.add_point((31 + n, 25, 12))
            done.append(n)

        threads = [threading.Thread(target=refine, args=(c, n)) for n, c in enumerate(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(done) == [0, 1, 2, 3] and time.monotonic() - t0 < 30
