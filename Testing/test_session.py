"""InteractiveSession behaviour: masks in the volume's grid, undo/redo, segments, crops, cache, bad inputs."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from MemorizingSAMLib.geometry import ImageError
from MemorizingSAMLib.modeling import build_sam3d
from MemorizingSAMLib.paste import Region
from MemorizingSAMLib.session import InteractiveSession, MaskEdit, Prompt, PromptError, SessionOptions


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_sam3d("memsam_tiny_student").eval()


def volume(shape=(40, 120, 110), seed=0):
    rng = np.random.default_rng(seed)
    v = rng.normal(100, 20, shape).astype(np.float32)
    v[10:30, 40:80, 30:70] += 300
    return v


@pytest.fixture
def session(model):
    s = InteractiveSession(model)
    s.set_image(volume(), spacing=(0.8, 0.8, 2.5))
    return s


def test_clicks_write_only_the_returned_region(session):
    sid = session.add_segment()
    before = session.mask(sid).copy()
    region = session.add_point((50, 60, 20))
    after = session.mask(sid)
    assert region is not None and not region.empty
    outside = np.ones(after.shape, bool)
    outside[region.slices] = False
    assert np.array_equal(before[outside], after[outside])
    assert after.dtype == np.uint8 and after.shape == (40, 120, 110)
    assert session.last_timing["encoded"] is True
    session.add_point((55, 65, 21), include=False)
    assert session.last_timing["encoded"] is False  # same crop: cached embedding


def test_returned_region_is_the_box_of_the_changed_voxels(session):
    """For changes of up to EXACT_BOX_MAX_BYTES packed bytes per tile: exact along k and j, within the 8 voxels of
    a packed byte along i (larger changes get their tile's box); always containing every changed voxel."""

    def check(m0, m1, region, exact=False):
        k, j, i = np.nonzero(m0 != m1)
        assert k.size and region is not None
        box = Region((i.min(), j.min(), k.min()), (i.max() + 1, j.max() + 1, k.max() + 1))
        assert region.union(box) == region
        if exact:
            assert region.lo[1:] == box.lo[1:] and region.hi[1:] == box.hi[1:], (region, box)
            assert box.lo[0] - 8 < region.lo[0] and region.hi[0] < box.hi[0] + 8, (region, box)

    session.add_segment()
    for p, inc in [((50, 60, 20), True), ((58, 66, 21), False), ((47, 57, 19), True)]:
        m0 = session.mask().copy()
        region = session.add_point(p, include=inc)
        check(m0, session.mask(), region)
    for step in (session.undo, session.redo):
        m0 = session.mask().copy()
        region = step()
        check(m0, session.mask(), region)
    # A result that grows by a thin shell (low-res logits of a 12 mm sphere, then 13 mm): the sampled region (the
    # positive low-res box plus its interpolation margin) is larger than what changes, the returned box is not.
    seg = session.segments[session.active]
    crop = seg.state.crop
    c = (np.arange(32) + 0.5) * 4 - 0.5
    dist = np.sqrt(sum((g - 64.0) ** 2 for g in np.meshgrid(c, c, c, indexing="ij"))) * crop.spacing
    for radius in (12.0, 13.0):
        low = torch.from_numpy((radius - dist).astype(np.float32))[None, None]
        state = type(seg.state)(crop=crop, prompts=seg.state.prompts, low_res=low, last_region=seg.state.last_region)
        m0 = session.mask().copy()
        region = session._commit(seg, seg.state, state, low)
    assert (session.mask() != m0).sum() <= MaskEdit.EXACT_BOX_MAX_BYTES
    check(m0, session.mask(), region, exact=True)
    sampled = seg.state.last_region
    assert region.voxels < 0.7 * sampled.voxels


def test_undo_redo_byte_for_byte(session):
    session.add_segment()
    states = [session.mask().copy()]
    for p, inc in [((50, 60, 20), True), ((60, 70, 22), False), ((45, 55, 18), True)]:
        session.add_point(p, include=inc)
        states.append(session.mask().copy())
    for want in reversed(states[:-1]):
        session.undo()
        assert np.array_equal(session.mask(), want)
    assert session.undo() is None
    for want in states[1:]:
        session.redo()
        assert np.array_equal(session.mask(), want)
    assert len(session.prompts()) == 3


def test_failure_part_way_through_the_paste_changes_nothing(session, monkeypatch):
    """Tiles are written as they are sampled; if one fails, the written ones are restored and no step is recorded."""
    import MemorizingSAMLib.session as session_module
    from MemorizingSAMLib.paste import PasteScratch

    session.options = SessionOptions(edge_refine=None)  # the tiled paste (the edge refinement writes one tile)
    session.add_segment()
    session.add_point((50, 60, 20))
    mask, prompts, steps = session.mask().copy(), session.prompts(), len(session.segments[session.active].undo)
    session._scratch = PasteScratch(tile_voxels=2000)  # many small tiles
    real = session_module.sample_tiles

    def failing(*args, **kwargs):
        for n, tile in enumerate(real(*args, **kwargs)):
            if n == 5:
                raise RuntimeError("simulated failure")
            tile.positive[...] = ~tile.positive  # every tile before it really changes the mask
            yield tile

    monkeypatch.setattr(session_module, "sample_tiles", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        session.add_point((60, 70, 22), include=False)
    assert np.array_equal(session.mask(), mask)
    assert session.prompts() == prompts and len(session.segments[session.active].undo) == steps
    monkeypatch.setattr(session_module, "sample_tiles", real)
    session.undo()  # the history still works: back to the empty mask
    assert not session.mask().any()


def test_a_failing_edge_refinement_changes_nothing(session, monkeypatch):
    import MemorizingSAMLib.session as session_module

    session.add_segment()
    session.add_point((50, 60, 20))
    mask, steps = session.mask().copy(), len(session.segments[session.active].undo)

    def failing(*args, **kwargs):
        raise MemoryError("simulated")

    monkeypatch.setattr(session_module, "refine", failing)
    with pytest.raises(MemoryError, match="simulated"):
        session.add_point((60, 70, 22), include=False)
    assert np.array_equal(session.mask(), mask) and len(session.segments[session.active].undo) == steps


def test_second_segment_leaves_first_alone(session):
    a = session.add_segment("a")
    session.add_point((50, 60, 20))
    mask_a = session.mask(a).copy()
    b = session.add_segment("b")
    session.add_point((80, 90, 25))
    session.add_point((52, 62, 20))
    session.undo(b)
    session.reset(b)
    assert np.array_equal(session.mask(a), mask_a)
    assert session.prompts(b) == ()


def test_protect_policy_never_takes_other_segments_voxels(model):
    s = InteractiveSession(model, SessionOptions(overlap="protect"))
    s.set_image(volume(), spacing=(0.8, 0.8, 2.5))
    a = s.add_segment()
    s.add_point((50, 60, 20))
    b = s.add_segment()
    s.add_point((50, 60, 20))
    assert s.mask(a).any()
    assert not (s.mask(a).astype(bool) & s.mask(b).astype(bool)).any()


def test_prompt_far_away_moves_crop_and_keeps_mask(model):
    s = InteractiveSession(model)
    s.set_image(volume((30, 300, 300)), spacing=(1.0, 1.0, 3.0))
    s.add_segment()
    s.add_point((40, 40, 15))
    first = s.mask().copy()
    crop1 = s.segments[s.active].state.crop
    s.add_point((260, 260, 15))  # 310 mm away: outside the 192 mm crop
    crop2 = s.segments[s.active].state.crop
    assert crop1 != crop2 and s.last_timing["encoded"]
    assert [p.ijk for p in s.prompts()] == [(260.0, 260.0, 15.0)]
    # the part of the first result outside the new crop is still there
    assert np.array_equal(s.mask()[:, :100, :100], first[:, :100, :100])


def test_newest_click_only_switch_changes_model_input(model):
    outs = []
    for newest in (False, True):
        s = InteractiveSession(model, SessionOptions(newest_click_only=newest))
        s.set_image(volume(), spacing=(0.8, 0.8, 2.5))
        s.add_segment()
        s.add_point((50, 60, 20))
        s.add_point((60, 70, 22), include=False)
        outs.append(s.segments[s.active].state.low_res)
    assert not torch.equal(outs[0], outs[1])


def test_box_prompt_clamps_to_box_and_normalises_corners(session):
    session.add_segment()
    region = session.add_box((70, 80, 25), (40, 50, 15))  # swapped corners
    m = session.mask()
    assert region is not None
    (box,) = session.prompts()
    assert box.ijk == (40.0, 50.0, 15.0) and box.box_hi == (70.0, 80.0, 25.0)
    nz = np.nonzero(m)
    assert nz[0].min() >= 15 and nz[0].max() <= 25 and nz[2].min() >= 40 and nz[2].max() <= 70


def test_set_prompts_replays_like_clicks(session):
    session.add_segment()
    session.add_point((50, 60, 20))
    session.add_point((60, 70, 22), include=False)
    direct = session.mask().copy()
    other = session.add_segment()
    session.set_prompts([Prompt((50, 60, 20), True), Prompt((60, 70, 22), False)], other)
    assert np.array_equal(session.mask(other), direct)
    session.set_prompts([Prompt((50, 60, 20), True)], other)  # a point deleted
    session.undo(other)
    assert np.array_equal(session.mask(other), direct)


PLACED = [
    Prompt((50, 60, 20), True, tag="a"),
    Prompt((58, 66, 21), False, tag="b"),
    Prompt((45, 55, 19), True, tag="c"),
    Prompt((62, 52, 22), False, tag="d"),
    Prompt((52, 64, 18), True, tag="e"),
]


def test_set_prompts_decodes_only_from_the_first_changed_prompt(session):
    """Appending or moving the newest prompt costs one decode; a change at prompt n replays from n on; each result
    equals the same prompts set from scratch (in placement order, tags kept through undo)."""

    def from_scratch(prompts):
        seg = session.add_segment()
        session.set_prompts(prompts, seg)
        assert session.last_timing["decodes"] == len(prompts)
        return session.mask(seg).copy()

    seg = session.add_segment()
    for n in range(1, len(PLACED) + 1):
        session.set_prompts(PLACED[:n], seg)
        assert session.last_timing["decodes"] == 1
    assert session.placed(seg) == tuple(PLACED)
    full = session.mask(seg).copy()
    assert np.array_equal(full, from_scratch(PLACED))
    moved_last = PLACED[:-1] + [Prompt((54, 66, 18), True, tag="e")]
    session.set_prompts(moved_last, seg)
    assert session.last_timing["decodes"] == 1
    assert np.array_equal(session.mask(seg), from_scratch(moved_last))
    moved_second = [PLACED[0], Prompt((60, 68, 21), False, tag="b"), *moved_last[2:]]
    session.set_prompts(moved_second, seg)
    assert session.last_timing["decodes"] == 4
    assert np.array_equal(session.mask(seg), from_scratch(moved_second))
    # The same position under another tag is another prompt.
    session.set_prompts([*moved_second[:-1], Prompt(moved_second[-1].ijk, True, tag="f")], seg)
    assert session.last_timing["decodes"] == 1
    # Deleting the newest prompt restores the state after the one before it without a decode.
    session.set_prompts(moved_second[:-1], seg)
    assert session.last_timing["decodes"] == 0
    assert np.array_equal(session.mask(seg), from_scratch(moved_second[:-1]))
    assert session.set_prompts(moved_second[:-1], seg) is None  # nothing changed: no step
    session.undo(seg)
    assert [p.tag for p in session.placed(seg)] == ["a", "b", "c", "d", "f"]
    session.undo(seg)
    session.undo(seg)
    assert session.placed(seg) == tuple(moved_last)
    session.undo(seg)
    assert session.placed(seg) == tuple(PLACED) and np.array_equal(session.mask(seg), full)
    session.redo(seg)
    session.set_prompts([*moved_last, Prompt((47, 57, 20), False, tag="g")], seg)  # extends the redone state
    assert session.last_timing["decodes"] == 1


def test_set_prompts_in_placement_order_differs_from_grouped_order(session):
    """The order the prompts were placed in is the order the model refines in (the Slicer module used to send
    all includes, then all excludes)."""
    a, b = session.add_segment(), session.add_segment()
    session.set_prompts(PLACED, a)
    session.set_prompts([p for p in PLACED if p.include] + [p for p in PLACED if not p.include], b)
    clicked = session.add_segment()
    for p in PLACED:
        session.add_point(p.ijk, p.include, clicked)
    assert np.array_equal(session.mask(a), session.mask(clicked))
    assert not np.array_equal(session.mask(a), session.mask(b))


def test_labelmap_export_roundtrip(session, tmp_path):
    a = session.add_segment()
    session.add_point((50, 60, 20))
    b = session.add_segment()
    session.add_point((90, 30, 8))
    path = tmp_path / "labels.nrrd"
    session.save_labelmap(path)
    back = sitk.ReadImage(str(path))
    assert back.GetSize() == session.image.GetSize()
    assert np.allclose(back.GetSpacing(), session.image.GetSpacing())
    lab = sitk.GetArrayFromImage(back)
    assert np.array_equal(lab == a, session.mask(a) > 0)
    assert np.array_equal(lab == b, (session.mask(b) > 0) & (session.mask(a) == 0))


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.full((20, 20, 20), np.nan, np.float32), "NaN or infinite"),
        (np.zeros((20, 20), np.float32), "3D"),
        (np.zeros((0, 20, 20), np.float32), "empty"),
        (np.full((20, 20, 20), 7, np.int16), "constant"),
    ],
)
def test_bad_images_are_refused_and_change_nothing(session, bad, message):
    sid = session.add_segment()
    session.add_point((50, 60, 20))
    mask = session.mask(sid).copy()
    with pytest.raises(ImageError, match=message):
        session.set_image(bad)
    assert session.geometry.size == (110, 120, 40)
    assert np.array_equal(session.mask(sid), mask)


def test_4d_and_inf_images_are_refused(model, tmp_path):
    s = InteractiveSession(model)
    img4 = sitk.JoinSeries([sitk.GetImageFromArray(volume((8, 8, 8))) for _ in range(3)])
    assert img4.GetDimension() == 4
    with pytest.raises(ImageError, match="3D"):
        s.set_image(img4)
    v = volume((10, 10, 10))
    v[3, 3, 3] = np.inf
    with pytest.raises(ImageError, match="1 NaN or infinite"):
        s.set_image(v)
    with pytest.raises(ImageError, match="no such image"):
        s.set_image(tmp_path / "missing.nii.gz")


def test_bad_prompts_change_nothing(session):
    session.add_segment()
    session.add_point((50, 60, 20))
    mask, prompts = session.mask().copy(), session.prompts()
    for call in (
        lambda: session.add_point((500, 60, 20)),
        lambda: session.add_point((50, 60, -3)),
        lambda: session.add_point((np.nan, 1, 1)),
        lambda: session.add_box((10, 10, 10), (30, 10, 20)),
        lambda: session.add_point((1, 2)),
    ):
        with pytest.raises(PromptError):
            call()
    assert np.array_equal(session.mask(), mask) and session.prompts() == prompts
    with pytest.raises(PromptError, match="no segment 99"):
        session.add_point((50, 60, 20), segment=99)


def test_embedding_cache_is_bounded():
    from MemorizingSAMLib.embedding_cache import EmbeddingCache

    c = EmbeddingCache(max_bytes=3 * 4096)
    for i in range(5):
        c.put(i, torch.zeros(1024))
    assert len(c) == 3 and c.get(0) is None and c.get(4) is not None


def test_large_uint8_volume_copied_at_most_once(tmp_path):
    # In a fresh process: RSS growth from set_image to the first mask stays below one extra volume copy.
    code = textwrap.dedent(
        """
        import resource, numpy as np, torch
        from MemorizingSAMLib.modeling import build_sam3d
        from MemorizingSAMLib.session import InteractiveSession
        torch.manual_seed(0)
        m = build_sam3d("memsam_tiny_student").eval()
        v = np.zeros((640, 640, 640), np.uint8); v[200:400, 200:400, 200:400] = 200; v[::5] += 3
        rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        s = InteractiveSession(m)
        # warm up torch's allocator and the model on a small volume: what follows measures the large one only
        s.set_image(v[:64, :64, :64].copy(), spacing=(3.0, 3.0, 3.0)); s.add_segment(); s.add_point((30, 30, 30))
        base = rss()
        s.set_image(v, spacing=(1.0, 1.0, 1.0)); s.add_segment(); s.add_point((300, 300, 300))
        print((rss() - base) / v.nbytes)
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    growth = float(r.stdout.strip().splitlines()[-1])
    # One copy (the SimpleITK image) plus crop-sized work (the 192 mm crop is 2.7 % of this volume, but its
    # temporaries and the mask pages it touches come to ~0.3 volume); a second whole copy would make it >= 2.
    assert growth < 1.6, f"peak RSS grew by {growth:.2f} volumes"


def test_bfloat16_upscaling_option_gives_nearly_the_same_masks(model):
    """SessionOptions(product_dtype="bfloat16"): masks agree with the exact path up to a few boundary voxels."""
    masks, logits = {}, {}
    for dtype in (None, "bfloat16"):
        s = InteractiveSession(model, SessionOptions(product_dtype=dtype))
        s.set_image(volume(), spacing=(0.8, 0.8, 2.5))
        sid = s.add_segment()
        for ijk, include in [((50, 60, 20), True), ((62, 58, 18), True), ((40, 45, 22), False)]:
            s.add_point(ijk, include=include)
        masks[dtype] = s.mask(sid).astype(bool)
        logits[dtype] = s.segments[sid].state.low_res
    assert 0 < (logits[None] - logits["bfloat16"]).abs().max() < 0.1  # the option reached the decoder
    a, b = masks[None], masks["bfloat16"]
    assert a.sum() > 1000
    assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.98
    with pytest.raises(ValueError, match="product_dtype"):
        SessionOptions(product_dtype="float16")


def test_points_reach_the_model_in_crop_voxels_and_a_locked_crop_clamps_them(model, monkeypatch):
    """Clicks go to the decoder as crop voxel coordinates (x, y, z), in order; with a locked crop (the published
    protocol) a click beyond the crop is put on its face, and clicks inside are passed as they are."""
    s = InteractiveSession(model)
    s.set_image(volume(shape=(40, 300, 110)), spacing=(0.8, 0.8, 2.5))
    sid = s.add_segment()
    s.lock_crop((50, 60, 20), sid)
    seen = []
    decode = model.decode

    def spy(emb, pts, lab, *args, **kwargs):
        seen.append((pts[0].numpy().copy(), lab[0].tolist()))
        return decode(emb, pts, lab, *args, **kwargs)

    monkeypatch.setattr(model, "decode", spy)
    s.add_point((50, 60, 20))
    s.add_point((52, 290, 21), include=False)  # j = 290: ~184 mm from the centre, beyond the 96 mm half-crop
    crop = s.segments[sid].state.crop
    pts, lab = seen[-1]
    assert lab == [1, 0]
    exact = crop.ras_to_crop(s.geometry.ijk_to_ras(np.array([[50.0, 60, 20], [52, 290, 21]])))
    np.testing.assert_allclose(pts[0], exact[0], atol=1e-4)
    assert not crop.contains(exact[1])
    np.testing.assert_allclose(pts[1], np.clip(exact[1], 0, crop.size - 1), atol=1e-4)


def test_a_click_repeated_at_one_spot_counts_once_towards_max_points(model, monkeypatch):
    """Only the newest ``max_points`` clicks reach the decoder, chosen by position: repeats of one click (the same
    voxel clicked again, as simulated users do) do not bring their older copies along."""
    s = InteractiveSession(model, SessionOptions(max_points=3))
    s.set_image(volume(), spacing=(0.8, 0.8, 2.5))
    s.add_segment()
    seen = []
    decode = model.decode

    def spy(emb, pts, lab, *args, **kwargs):
        seen.append(lab[0].tolist())
        return decode(emb, pts, lab, *args, **kwargs)

    monkeypatch.setattr(model, "decode", spy)
    clicks = [((50, 60, 20), True), ((55, 62, 20), False), ((50, 60, 20), True), ((45, 58, 21), True)]
    for ijk, include in clicks + clicks:
        s.add_point(ijk, include)
    assert [len(lab) for lab in seen] == [1, 2, 3, 3, 3, 3, 3, 3]
    assert seen[-1] == [0, 1, 1]  # the last three clicks, in order


def test_undo_history_is_bounded_and_what_stays_still_restores_exactly(model):
    """Beyond max_undo_bytes the oldest steps go (the newest always stays); the steps kept undo to the masks of
    their time byte for byte, and the count of bytes held matches the steps kept."""
    probe = InteractiveSession(model)
    probe.set_image(volume(), spacing=(0.8, 0.8, 2.5))
    probe.add_segment()
    probe.add_point((50, 60, 20))
    one_step = probe.segments[probe.active].undo[-1].nbytes
    assert one_step > 0

    s = InteractiveSession(model, SessionOptions(max_undo_bytes=3 * one_step))
    s.set_image(volume(), spacing=(0.8, 0.8, 2.5))
    sid = s.add_segment()
    clicks = [((50, 60, 20), True), ((55, 62, 20), True), ((45, 58, 21), False), ((52, 66, 19), True)]
    clicks += [((48, 57, 20), True), ((58, 60, 21), False), ((50, 64, 20), True), ((46, 62, 19), True)]
    masks = [s.mask(sid).copy()]
    for ijk, include in clicks:
        s.add_point(ijk, include)
        masks.append(s.mask(sid).copy())
    seg = s.segments[sid]
    assert 1 <= len(seg.undo) < len(clicks)
    assert seg.undo_bytes == sum(st.nbytes for st in seg.undo)
    assert seg.undo_bytes <= 3 * one_step or len(seg.undo) == 1
    kept = len(seg.undo)
    for n in range(1, kept + 1):
        s.undo(sid)
        assert np.array_equal(s.mask(sid), masks[-1 - n])
    assert s.undo(sid) is None and np.array_equal(s.mask(sid), masks[-1 - kept])  # the dropped ones are gone
    for _ in range(kept):
        s.redo(sid)
    assert np.array_equal(s.mask(sid), masks[-1]) and seg.undo_bytes == sum(st.nbytes for st in seg.undo)

    tiny = InteractiveSession(model, SessionOptions(max_undo_bytes=0))
    tiny.set_image(volume(), spacing=(0.8, 0.8, 2.5))
    t = tiny.add_segment()
    for ijk, include in clicks[:3]:
        tiny.add_point(ijk, include)
    assert len(tiny.segments[t].undo) == 1  # the newest step stays whatever the bound
    with pytest.raises(ValueError, match="max_undo_bytes"):
        SessionOptions(max_undo_bytes=-1)
    with pytest.raises(ValueError, match="max_points"):
        SessionOptions(max_points=0)


def test_kept_states_are_bounded_and_older_changes_replay_from_the_newest_kept(session):
    """The state after each prompt costs a low-res logit volume: only the newest max_chain_states stay, and a change
    before them replays from the start (more decodes, the same mask)."""
    s = InteractiveSession(session.model, SessionOptions(max_chain_states=3))
    s.set_image(volume(), spacing=(0.8, 0.8, 2.5))
    seg = s.add_segment()
    for n in range(1, 7):
        s.set_prompts(PLACED[: n % 5 + 1] if n <= 4 else PLACED + [Prompt((49, 59, 20), n % 2 == 0, tag=f"x{n}")], seg)
    placed = list(s.placed(seg))
    assert sum(st is not None for st in s.segments[seg].state.chain) == 3 and len(placed) == 6
    moved = placed[:1] + [Prompt((57, 65, 21), False, tag="b")] + placed[2:]
    s.set_prompts(moved, seg)
    assert s.last_timing["decodes"] == 6  # prompt 2 changed, no state kept before it but the base
    fresh = s.add_segment()
    s.set_prompts(moved, fresh)
    assert np.array_equal(s.mask(seg), s.mask(fresh))
    s.set_prompts(moved[:-1] + [Prompt((50, 61, 20), True, tag="y")], seg)
    assert s.last_timing["decodes"] == 1


def test_prompt_errors_print_plain_numbers(session):
    session.add_segment()
    with pytest.raises(PromptError) as e:
        session.add_box(np.array([5.0, 5, 5]), np.array([5.0, 9, 9]))
    assert str(e.value) == "the box (5, 5, 5)-(5, 9, 9) has zero size along an axis"
    with pytest.raises(PromptError, match=r"point \(i, j, k\) = \(500, 1, 1\) lies outside"):
        session.add_point(np.array([500.0, 1, 1]))


def _held_bytes(root) -> int:
    """Bytes reachable from ``root``, counted independently of the session's own accounting: array and tensor
    buffers once each (by base / storage), plus every other object's own size."""
    import gc

    seen, buffers, total, todo = set(), set(), 0, [root]
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, type | type(sys) | torch.nn.Module):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            st = obj.untyped_storage()
            if st.data_ptr() not in buffers:
                buffers.add(st.data_ptr())
                total += st.nbytes()
            continue
        if isinstance(obj, np.ndarray):
            base = obj if obj.base is None else obj.base
            if id(base) not in buffers:
                buffers.add(id(base))
                total += base.nbytes if isinstance(base, np.ndarray) else sys.getsizeof(base)
            continue
        total += sys.getsizeof(obj)
        todo.extend(gc.get_referents(obj))
    return total


def test_a_long_click_series_holds_what_its_undo_cap_says(model):
    """1,500 clicks in one segment: what the undo steps really hold (walked object by object) stays within the
    bytes they are charged for, plus a small per-step overhead. Before the prompt tuples were charged, each step
    carried ~24 bytes per prompt uncounted, and 10,000 clicks grew memory far beyond the cap."""
    s = InteractiveSession(model, SessionOptions(max_undo_bytes=2 * 2**20, max_chain_states=4))
    s.set_image(volume(), spacing=(0.8, 0.8, 2.5))
    sid = s.add_segment()
    rng = np.random.default_rng(3)
    for n in range(1500):
        ijk = (int(rng.integers(44, 57)), int(rng.integers(54, 67)), int(rng.integers(18, 23)))
        s.add_point(ijk, include=bool(n % 3))
    seg = s.segments[sid]
    assert len(seg.state.prompts) == 1500 and seg.undo_bytes <= 2 * 2**20
    held = _held_bytes(seg.undo)
    # Shared by every step and not theirs to charge: the Prompt objects (the current state holds them anyway) and
    # the low-res logits of the chain states older than the oldest step kept (bounded by max_chain_states).
    prompts = _held_bytes(seg.state.prompts)
    chain = (4 + 1) * seg.state.low_res.numel() * seg.state.low_res.element_size()
    allowed = 1.05 * seg.undo_bytes + prompts + chain + 4096 * len(seg.undo)
    assert held <= allowed, (held, allowed, seg.undo_bytes, len(seg.undo))


def test_errors_print_numbers_as_a_user_typed_them(session):
    """Points given as numpy scalars (as a viewer passes them) are named plainly, not as np.float64(600.0)."""
    session.add_segment()
    with pytest.raises(PromptError) as e:
        session.add_point((np.float64(600.0), np.int64(3), np.float32(2.5)))
    assert "np." not in str(e.value) and "(600, 3, 2.5)" in str(e.value), str(e.value)
