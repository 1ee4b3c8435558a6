"""The inference server as a real process on 127.0.0.1, driven by RemoteSession and raw HTTP."""

import http.client
import io
import json
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from server_fixtures import tiny_checkpoint, volume

from MemorizingSAMLib.checkpoints import load_model
from MemorizingSAMLib.client import RemoteError, RemoteSession
from MemorizingSAMLib.server_process import ServerProcess, free_port
from MemorizingSAMLib.session import InteractiveSession, Prompt

TOKEN = "s3cret-token"
SPACING = (1.1, 0.9, 2.0)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("m"))


def start_server(ckpt, token_file, *extra):
    """A real ``memsam serve`` process on a free port of 127.0.0.1, once it answers: (process, url)."""
    server = ServerProcess(["--model", ckpt, "--token-file", token_file, "--device", "cpu", *extra]).start()
    return server, server.url


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    tok = tmp_path_factory.mktemp("t") / "token"
    tok.write_text(TOKEN + "\n")
    return tok


@pytest.fixture(scope="module")
def server(ckpt, token_file):
    # Masks are compared byte for byte with in-process ones: the decoder's rounding depends on the thread count
    # (measured: logits differ by ~2e-6 between 1 and 2 threads), so the server uses this process's.
    threads = str(torch.get_num_threads())
    proc, url = start_server(ckpt, token_file, "--max-upload-mb", "1", "--max-sessions", "12", "--threads", threads)
    yield url
    proc.stop()


def local_masks(ckpt, clicks, seed=0):
    s = InteractiveSession(load_model(ckpt).prepare_for_inference())
    s.set_image(volume(seed), spacing=SPACING)
    s.add_segment()
    out = []
    for ijk, inc in clicks:
        s.add_point(ijk, inc)
        out.append(s.mask().copy())
    return out


def random_clicks(seed, n):
    rng = np.random.default_rng(seed)
    return [
        ((float(rng.integers(14, 40)), float(rng.integers(12, 36)), float(rng.integers(6, 18))), bool(i % 3 != 2))
        for i in range(n)
    ]


def test_info_and_schema(server):
    info = RemoteSession(server, TOKEN).info()
    assert info["model"] == "memsam_tiny_student" and info["limits"]["max_upload_bytes"] == 2**20
    assert info["threads"] == torch.get_num_threads()
    schema = json.loads(urllib.request.urlopen(server + "/openapi.json").read())
    paths = schema["paths"]
    assert "/sessions/{sid}/segments/{seg}/points" in paths
    # every answer and every body is documented (pydantic models), the upload as binary
    for path, ops in paths.items():
        for method, op in ops.items():
            answer = op["responses"]["200"]["content"]["application/json"]["schema"]
            assert answer.get("$ref") or answer.get("properties"), (method, path)
    bodies = {
        p: paths[p]["post"]["requestBody"]["content"] for p in paths if p.endswith(("points", "boxes", "prompts"))
    }
    assert len(bodies) == 3 and all("$ref" in b["application/json"]["schema"] for b in bodies.values())
    assert paths["/sessions"]["post"]["requestBody"]["content"]["application/octet-stream"]
    point = schema["components"]["schemas"]["PointIn"]
    assert point["properties"]["include"]["type"] == "boolean" and point["required"] == ["ijk"]


def test_threads_and_undo_options_reach_the_sessions(ckpt, token_file, memsam):
    proc, url = start_server(ckpt, token_file, "--threads", "1", "--max-undo-mb", "0")
    try:
        r = RemoteSession(url, TOKEN)
        info = r.info()
        assert info["threads"] == 1 and info["limits"]["undo_bytes_per_segment"] == 0
        r.set_image(volume(), spacing=SPACING)
        r.add_segment()
        masks = []
        for ijk, include in random_clicks(3, 3):
            r.add_point(ijk, include)
            masks.append(r.mask().copy())
        assert not np.array_equal(masks[0], masks[1])  # so that a second undo would show
        r.undo()  # the newest step is always kept ...
        assert np.array_equal(r.mask(), masks[1])
        r.undo()  # ... and with no room for more, it was the only one
        assert np.array_equal(r.mask(), masks[1])
    finally:
        proc.stop()
    for bad in (("--threads", "0"), ("--max-undo-mb", "-1")):
        r = memsam("serve", "--model", ckpt, *bad, "--port", free_port())
        assert r.returncode != 0 and bad[0] in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_remote_equals_in_process_with_undo_redo_and_prompts(server, ckpt):
    clicks = random_clicks(1, 5)
    expected = local_masks(ckpt, clicks)
    r = RemoteSession(server, TOKEN)
    r.set_image(volume(), spacing=SPACING)
    r.add_segment()
    for (ijk, inc), want in zip(clicks, expected):
        r.add_point(ijk, inc)
        assert np.array_equal(r.mask(), want)
    r.undo()
    assert np.array_equal(r.mask(), expected[-2])
    r.redo()
    assert np.array_equal(r.mask(), expected[-1])
    r.set_prompts([Prompt(clicks[0][0], True)])
    assert np.array_equal(r.mask(), expected[0])
    assert r.last_timing["decodes"] == 0  # the state after the first click was kept
    # Tags travel both ways and follow undo: the module rebuilds its markups from them.
    r.set_prompts([Prompt(clicks[0][0], True, tag="p1"), Prompt(clicks[1][0], clicks[1][1], tag="p2")])
    assert r.last_timing["decodes"] == 2 and [p.tag for p in r.placed()] == ["p1", "p2"]
    r.undo()
    assert [p.tag for p in r.placed()] == [None] and np.array_equal(r.mask(), expected[0])
    r.close()


def test_eight_concurrent_clients_thirty_clicks(server, ckpt):
    def client(k):
        clicks = random_clicks(100 + k, 30)
        r = RemoteSession(server, TOKEN)
        r.set_image(volume(k), spacing=SPACING)
        r.add_segment()
        got = []
        for ijk, inc in clicks:
            r.add_point(ijk, inc)
            got.append(r.mask().copy())
        r.close()
        return k, clicks, got

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(client, range(8)))
    for k, clicks, got in results:
        want = local_masks(ckpt, clicks, seed=k)
        assert all(np.array_equal(a, b) for a, b in zip(got, want)), f"client {k} differs"


def raw(server, method, path, body=b"", token=TOKEN, ctype="application/json"):
    req = urllib.request.Request(server + path, data=body, method=method)
    req.add_header("Content-Type", ctype)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_oversized_uploads_get_413_not_a_broken_connection(server):
    # The server reads a refused body before answering. Answering while the client is still sending resets the
    # connection: every one of 50 uploads of 8 MB did without that, and ~6 % of 1 MB ones under load.
    for size in (8 * 10**6, 2**20 + 10, 8 * 10**6):
        status, body = raw(server, "POST", "/sessions?format=npz", b"x" * size, ctype="application/octet-stream")
        assert status == 413 and "limit" in body["detail"]
    # the same without a content-length (chunked): refused once the count passes the limit
    host, port = server.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    chunks = (b"x" * 2**16 for _ in range(128))  # 8 MB
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/octet-stream"}
    conn.request("POST", "/sessions?format=npz", body=chunks, headers=headers, encode_chunked=True)
    reply = conn.getresponse()
    assert reply.status == 413 and "limit" in json.loads(reply.read())["detail"]
    conn.close()
    # RemoteSession checks the server's limit before sending, and says which limit
    r = RemoteSession(server, TOKEN)
    before = r.info()["sessions"]
    noise = np.random.default_rng(0).integers(0, 256, (40, 200, 200), dtype=np.uint8)
    with pytest.raises(RemoteError, match="upload limit of 1048576 bytes") as e:
        r.set_image(noise, spacing=SPACING)
    assert e.value.status == 413 and r.info()["sessions"] == before and r.sid is None


def test_bad_requests_get_4xx_and_server_keeps_serving(server):
    r = RemoteSession(server, TOKEN)
    r.set_image(volume(), spacing=SPACING)
    seg = r.add_segment()
    cases = [
        (
            raw(server, "POST", "/sessions?format=npz", b"x" * (2**20 + 10), ctype="application/octet-stream"),
            413,
            "limit",
        ),
        (
            raw(server, "POST", "/sessions?format=npz", b"not an npz", ctype="application/octet-stream"),
            400,
            "cannot read",
        ),
        (raw(server, "POST", f"/sessions/{r.sid}/segments/{seg}/points", b"{not json"), 422, ""),
        (raw(server, "POST", f"/sessions/{r.sid}/segments/{seg}/points", b'{"include": true}'), 422, "ijk"),
        (raw(server, "POST", "/sessions/nope/segments", b"{}"), 404, "no session"),
        (raw(server, "POST", f"/sessions/{r.sid}/segments/99/points", b'{"ijk": [1,1,1]}'), 404, "no segment"),
        (raw(server, "POST", f"/sessions/{r.sid}/segments/{seg}/points", b'{"ijk": [500, 1, 1]}'), 422, "outside"),
        (raw(server, "GET", "/info", None, token="wrong"), 401, "token"),
        (raw(server, "GET", "/info", None, token=None), 401, "token"),
    ]
    for (status, body), want, text in cases:
        assert status == want, (status, body)
        assert text in json.dumps(body)
    r.add_point((20, 20, 10))  # the next good request succeeds
    assert r.mask().shape == (24, 48, 56)
    with pytest.raises(RemoteError, match="outside"):
        r.add_point((999, 0, 0))


def test_damaged_gzip_uploads_are_refused(server, tmp_path):
    """A truncated .nii.gz, or one with flipped bytes, used to load with wrong voxels; now a 400 naming it."""
    img = sitk.GetImageFromArray(volume())
    path = tmp_path / "v.nii.gz"
    sitk.WriteImage(img, str(path), useCompression=True)
    data = path.read_bytes()
    flipped = bytearray(data)
    mid = slice(len(data) // 2, len(data) // 2 + 64)
    flipped[mid] = bytes(b ^ 0xFF for b in flipped[mid])
    for body in (data[: len(data) // 2], bytes(flipped)):
        status, reply = raw(server, "POST", "/sessions?format=nii.gz", body, ctype="application/octet-stream")
        assert status == 400 and "damaged gzip" in reply["detail"], (status, reply)
    status, reply = raw(server, "POST", "/sessions?format=nii.gz", data, ctype="application/octet-stream")
    assert status == 200, reply


def npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def huge_declared_npz() -> bytes:
    """An npz whose 'array' header declares 2000^3 uint8 voxels (8 GB) over a few bytes of data."""
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": "|u1", "fortran_order": False, "shape": (2000, 2000, 2000)})
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("array.npy", head.getvalue() + b"\0" * 64)
        for name, v in (("spacing", [1.0] * 3), ("origin", [0.0] * 3), ("direction", np.eye(3).reshape(-1))):
            b = io.BytesIO()
            np.save(b, np.asarray(v, np.float64))
            z.writestr(f"{name}.npy", b.getvalue())
    return buf.getvalue()


def test_bad_uploads_and_bodies_are_4xx_and_leave_nothing_behind(server):
    """Each used to be a bare 500, a decode of gigabytes, or work without bound on the shared model thread."""
    before = RemoteSession(server, TOKEN).info()["sessions"]
    small = volume()[:20, :40, :40]  # well under the test server's 1 MB upload limit
    good = dict(array=small, spacing=np.array(SPACING), origin=np.zeros(3), direction=np.eye(3).reshape(-1))

    def upload(body):
        return raw(server, "POST", "/sessions?format=npz", body, ctype="application/octet-stream")

    cases = [
        (npz_bytes(**{**good, "array": small > 100}), 400, "dtype bool"),
        (npz_bytes(**{**good, "array": small.astype(np.float16)}), 400, "dtype float16"),
        (npz_bytes(**{**good, "array": small.astype(np.complex64)}), 400, "dtype complex64"),
        (npz_bytes(**{**good, "spacing": np.array([1.0, 0.0, 1.0])}), 400, "spacing must be positive"),
        (npz_bytes(**{**good, "spacing": np.array([1.0, 1.0])}), 400, "'spacing' must be 3"),
        (npz_bytes(**{**good, "direction": np.zeros(9)}), 400, "not orthonormal"),
        (npz_bytes(**{**good, "origin": np.array([np.nan, 0, 0])}), 400, "'origin' must be 3 finite"),
        (huge_declared_npz(), 413, "exceed the limit"),
    ]
    for body, status, text in cases:
        try:
            got, reply = upload(body)
        except Exception as e:
            raise AssertionError(text) from e
        assert got == status and text in reply["detail"], (text, got, reply)
    assert RemoteSession(server, TOKEN).info()["sessions"] == before  # nothing half-created
    r = RemoteSession(server, TOKEN)
    r.set_image(volume(), spacing=SPACING)
    seg = r.add_segment()
    base = f"/sessions/{r.sid}/segments/{seg}"
    for path, body, status, text in [
        ("/points", {"ijk": {"i": 1, "j": 2, "k": 3}}, 422, "three numbers"),
        ("/points", {"ijk": [30, 24, 12], "include": "false"}, 422, "true or false"),
        ("/prompts", {"prompts": [{"ijk": [30, 24, 12], "include": "no"}]}, 422, "true or false"),
        ("/prompts", {"prompts": [{"ijk": [20 + n % 20, 24, 12]} for n in range(300)]}, 422, "limit of 256"),
        ("/boxes", {"ijk_min": [1, 2], "ijk_max": [3, 4, 5]}, 422, "three numbers"),
    ]:
        got, reply = raw(server, "POST", base + path, json.dumps(body).encode())
        assert got == status and text in reply["detail"], (path, got, reply)
    got, reply = raw(server, "POST", base + "/points", b'{"ijk": [1, 1, 1], "pad": "' + b"x" * 2**21 + b'"}')
    assert got == 413 and "limit" in reply["detail"]
    assert r.placed(seg) == ()  # none of that reached the session
    r.add_point((30, 24, 12))
    assert len(r.placed(seg)) == 1
    r.close()


def test_client_never_resends_what_the_server_may_have_applied():
    """A server that read the request and then dropped the connection (a crash or a timeout mid-work): the click
    is not sent a second time, and the error names the server. A server that is gone: the same kind of error."""
    received = []
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    port = listener.getsockname()[1]

    def serve_once():
        for _ in range(2):
            listener.settimeout(3)
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            received.append(conn.recv(65536))
            conn.close()  # no answer

    t = threading.Thread(target=serve_once, daemon=True)
    t.start()
    r = RemoteSession(f"http://127.0.0.1:{port}", TOKEN, timeout=3)
    r.sid, r.size, r.active = "s", (10, 10, 10), 1
    r.masks[1] = np.zeros((10, 10, 10), np.uint8)
    with pytest.raises(RemoteError, match=f"no answer from http://127.0.0.1:{port}") as e:
        r.add_box((1, 1, 1), (5, 5, 5))
    assert e.value.status == 0
    t.join(5)
    assert len(received) == 1 and received[0].startswith(b"POST ")
    listener.close()
    gone = RemoteSession(f"http://127.0.0.1:{port}", TOKEN, timeout=3)
    with pytest.raises(RemoteError, match="no answer from"):
        gone.info()


def test_a_compressed_upload_declaring_too_many_voxels_is_refused_before_decoding(server, tmp_path):
    """A 0.9 MB .nii.gz of zeros that expands to 1.1 GB used to be decoded first (3 GB RSS, /health blocked):
    the header's voxel count is checked against the server's limit before the rest is decompressed."""
    import gzip

    small = tmp_path / "small.nii"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 2, 2), np.uint8)), str(small))
    head = bytearray(small.read_bytes()[:352])
    head[42:48] = np.array([1100, 1024, 1024], "<i2").tobytes()  # 1.15 G uint8 voxels, over the 1024^3 limit
    body = gzip.compress(bytes(head) + b"\0" * (1 << 20))  # the first MB of those zeros is enough to tell
    assert len(body) < 2**20
    t = time.perf_counter()
    status, reply = raw(server, "POST", "/sessions?format=nii.gz", body, ctype="application/octet-stream")
    assert status == 413 and "more than the limit" in reply["detail"], reply
    assert time.perf_counter() - t < 5


def test_uploads_left_by_a_killed_server_are_removed(ckpt, token_file):
    import tempfile

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = Path(tempfile.gettempdir()) / f"memsam-serve-{dead.pid}-abc"
    stale.mkdir(exist_ok=True)
    (stale / "tmp123.nii.gz").write_bytes(b"x" * 1000)
    proc, url = start_server(ckpt, token_file)
    try:
        assert not stale.exists()
        mine = [p for p in Path(tempfile.gettempdir()).glob(f"memsam-serve-{proc.pid}-*")]
        assert len(mine) == 1 and not any(mine[0].iterdir())
    finally:
        proc.stop()


def test_slow_headers_are_cut_off_and_normal_clients_are_not(ckpt, token_file):
    """300 slow-loris connections used to stay open for good: a connection whose headers do not arrive within the
    header timeout is closed; a client that takes its time between requests is only closed when idle."""
    proc, url = start_server(ckpt, token_file, "--header-timeout", "1")
    port = int(url.rsplit(":", 1)[1])
    try:
        slow = []
        for _ in range(20):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # never finishes its headers
            s.settimeout(10)
            slow.append(s)
        t = time.perf_counter()
        for s in slow:
            assert s.recv(100) == b""  # closed by the server
            s.close()
        assert time.perf_counter() - t < 8
        r = RemoteSession(url, TOKEN)
        assert r.info()["limits"]["header_timeout_s"] == 1.0
        time.sleep(0.5)
        assert r.info()["model"]  # the same kept-alive connection, its next request in time
        r.close()
    finally:
        proc.stop()


def test_chunked_json_bodies_are_bounded_too(server):
    r = RemoteSession(server, TOKEN)
    r.set_image(volume(), spacing=SPACING)
    seg = r.add_segment()
    host, port = server.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    chunks = (b'{"ijk": [1, 1, 1], "pad": "' if i == 0 else b"x" * 2**16 for i in range(64))  # 4 MB, no length
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    conn.request("POST", f"/sessions/{r.sid}/segments/{seg}/points", body=chunks, headers=headers, encode_chunked=True)
    reply = conn.getresponse()
    assert reply.status == 413 and "limit" in json.loads(reply.read())["detail"]
    conn.close()
    assert r.info()["sessions"] >= 1 and r.placed(seg) == ()


def test_health_answers_while_an_upload_is_decoded(server):
    """Decoding runs off the event loop: /health answered in 6.1 s while one upload was decoded."""
    import gzip

    arr = np.zeros((800, 512, 512), np.uint8)  # 210 MB of voxels in a ~200 KB upload
    arr[100:300, 100:300, 100:300] = 7
    img = sitk.GetImageFromArray(arr)
    path = Path(tempfile.mkdtemp()) / "big.nii"
    sitk.WriteImage(img, str(path))
    body = gzip.compress(path.read_bytes(), 6)
    path.unlink()
    assert len(body) < 2**20
    done = {}

    def upload():
        t = time.perf_counter()
        done["status"] = raw(server, "POST", "/sessions?format=nii.gz", body, ctype="application/octet-stream")[0]
        done["s"] = time.perf_counter() - t

    t = threading.Thread(target=upload)
    t.start()
    waits = []
    while t.is_alive():
        t0 = time.perf_counter()
        raw(server, "GET", "/health", None)
        waits.append(time.perf_counter() - t0)
        time.sleep(0.02)
    t.join()
    # Were the decode on the event loop, the /health asked during it would wait for nearly all of it (max(waits)
    # close to s); off the loop, each answer takes a few ms. The upload must last long enough to tell the two apart
    # at the 20 ms polling step: 0.2 s at least (it took 0.50 s on the fastest CI machine seen, 6 s on a slow one).
    assert done["status"] == 200 and done["s"] > 0.2, done
    assert len(waits) >= 3 and max(waits) < 0.5 * done["s"], (max(waits), done)


def test_both_sessions_satisfy_one_protocol_and_evaluate_alike(server, ckpt):
    """InteractiveSession and RemoteSession answer the same calls with the same parameters, and the evaluation
    harness gets the same Dice per click through either."""
    import inspect

    from MemorizingSAMLib.evaluation.runner import SessionSegmenter, run_target
    from MemorizingSAMLib.protocol import SegmentationSession

    remote = RemoteSession(server, TOKEN)
    local = InteractiveSession(load_model(ckpt).prepare_for_inference())
    for s in (remote, local):
        assert isinstance(s, SegmentationSession)
    for name in [m for m in dir(SegmentationSession) if not m.startswith("_") and m != "last_timing"]:
        want = list(inspect.signature(getattr(SegmentationSession, name)).parameters)
        for s in (remote, local):
            got = ["self", *inspect.signature(getattr(s, name)).parameters]
            assert got == want, (type(s).__name__, name, got)

    img = sitk.GetImageFromArray(volume(3))
    img.SetSpacing(SPACING)
    gt = np.zeros((24, 48, 56), np.uint8)
    gt[6:18, 12:36, 14:40] = 1
    results = []
    for session in (remote, local):
        seg = SessionSegmenter(session=session, name=type(session).__name__)
        seg.set_image(img)
        run_target(seg, gt, SPACING, 2)
        results.append(run_target(seg, gt, SPACING, 4))  # the first target's segment is removed first
        assert list(session.masks if session is remote else session.segments) == [seg.seg]
    assert results[0]["dice"] == results[1]["dice"] and results[0]["clicks"] == results[1]["clicks"]
    assert len(results[0]["dice"]) == 4
    remote.close()
