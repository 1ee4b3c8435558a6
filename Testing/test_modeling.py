"""Model structure: parameter counts, fast-path ops against torch's modules, the sparse backend, configs."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from MemorizingSAMLib.modeling import EncoderConfig, build_sam3d, get_config
from MemorizingSAMLib.modeling.ops import conv_stride_eq_kernel, patchify
from MemorizingSAMLib.modeling.sparse_attention import grouped_attention


@pytest.mark.parametrize("name,count", [("sam_med3d_vit_b", 100_509_232), ("fastsam3d", 53_224_240)])
def test_published_parameter_counts(name, count):
    with torch.device("meta"):
        assert build_sam3d(name).count_parameters() == count


def test_decoder_upscaling_equals_torch_modules():
    # upscale_to_masks (products in sub-voxel order, one gather at the end) against the literal module chain
    torch.manual_seed(0)
    dec = build_sam3d("memsam_tiny_student").mask_decoder.double()
    up1, ln, act1, up2, act2 = dec.output_upscaling
    tokens = torch.randn(2, 512, 96, dtype=torch.float64)
    hyper = torch.randn(2, 3, 12, dtype=torch.float64)
    feat = tokens.transpose(1, 2).reshape(2, 96, 8, 8, 8)
    u = act2(up2(act1(ln(up1(feat)))))  # (2, 12, 32, 32, 32)
    ref = torch.einsum("bmc,bcdhw->bmdhw", hyper, u)
    assert torch.allclose(dec.upscale_to_masks(tokens, hyper, 8), ref, atol=1e-10)
    # inference takes the chunked second product (chunks that do not divide the 4096 rows, batch of 2, 3 masks)
    dec.UPSCALE_CHUNK_ROWS = 1000
    with torch.no_grad():
        assert torch.allclose(dec.upscale_to_masks(tokens, hyper, 8), ref, atol=1e-10)


@pytest.mark.parametrize("k", [1, 2])
def test_conv_stride_eq_kernel_equals_module(k):
    torch.manual_seed(1)
    conv = nn.Conv3d(3, 7, kernel_size=k, stride=k).double()
    x = torch.randn(2, 3, 4, 6, 8, dtype=torch.float64)
    ref = conv(x).permute(0, 2, 3, 4, 1)
    assert torch.allclose(conv_stride_eq_kernel(x.permute(0, 2, 3, 4, 1), conv), ref, atol=1e-12)


def test_patch_embedding_equals_conv():
    torch.manual_seed(2)
    conv = nn.Conv3d(1, 4, kernel_size=4, stride=4).double()
    x = torch.randn(1, 1, 8, 12, 16, dtype=torch.float64)
    ref = conv(x).permute(0, 2, 3, 4, 1)
    ours = F.linear(patchify(x, 4), conv.weight.reshape(4, -1), conv.bias)
    assert torch.allclose(ours, ref, atol=1e-12)


@pytest.mark.parametrize("dilated", [False, True])
def test_grouped_attention_equals_masked_dense(dilated):
    torch.manual_seed(3)
    g, group, hd = 4, 2, 8
    q, k, v = (torch.randn(1, 2, g**3, hd, dtype=torch.float64) for _ in range(3))
    idx = torch.arange(g)
    a, b, c = (t.reshape(-1) for t in torch.meshgrid(idx, idx, idx, indexing="ij"))
    m = g // group
    if dilated:
        gid = (a % m) * m * m + (b % m) * m + (c % m)
    else:
        gid = (a // group) * m * m + (b // group) * m + (c // group)
    allowed = gid[:, None] == gid[None, :]
    assert allowed.sum(1).eq(group**3).all()
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    ours = grouped_attention(q, k, v, g, group, dilated, hd**-0.5)
    assert torch.allclose(ours, ref, atol=1e-12)


def test_sparse_backend_runs_and_refuses_rel_pos():
    m = build_sam3d("memsam_tiny_sparse").eval()
    with torch.no_grad():
        emb = m.encode(torch.randn(1, 1, 64, 64, 64))
    assert emb.shape == (1, 96, 8, 8, 8) and torch.isfinite(emb).all()
    with pytest.raises(ValueError, match="rel_pos"):
        EncoderConfig(attention_backend="grouped", window_size=0, global_attn_indexes=()).validate()


def test_published_models_have_no_box_embeddings():
    with torch.device("meta"):
        m = build_sam3d("fastsam3d")
    with pytest.raises(ValueError, match="no box embeddings"):
        m.prompt_encoder.embed_boxes(torch.zeros(1, 2, 3, device="meta"))


def test_unknown_config_name_lists_known():
    with pytest.raises(ValueError, match="known: .*fastsam3d"):
        get_config("vit_h")


def test_config_dict_roundtrip():
    for name in ("sam_med3d_vit_b", "fastsam3d", "memsam_tiny_sparse"):
        cfg = get_config(name)
        assert type(cfg).from_dict(cfg.to_dict()) == cfg


def test_multimask_selects_masks_one_to_three():
    torch.manual_seed(4)
    m = build_sam3d("memsam_tiny_student").eval()
    emb = torch.randn(1, 96, 8, 8, 8)
    pts, lab = torch.tensor([[[10, 20, 30]]]), torch.tensor([[1]])
    with torch.no_grad():
        single, iou1 = m.decode(emb, pts, lab)
        multi, iou3 = m.decode(emb, pts, lab, multimask_output=True)
    assert single.shape == (1, 1, 32, 32, 32) and multi.shape == (1, 3, 32, 32, 32)
    assert not torch.allclose(single[:, 0], multi[:, 0])
    assert iou3.shape == (1, 3)


@pytest.mark.parametrize("packed", [False, True])
def test_bfloat16_upscaling_is_close_and_really_reduced(packed):
    """product_dtype=torch.bfloat16: the two upscaling products in bf16 (packed oneDNN weights made on first use, or
    cast per call without packs); logits close to the exact ones, and not the fp32 path in disguise."""
    torch.manual_seed(3)
    m = build_sam3d("memsam_tiny_student").eval()
    if packed:
        m.prepare_for_inference()
    dec = m.mask_decoder
    tokens = torch.randn(1, 512, 96)
    hyper = torch.randn(1, 1, 12)

    def reference():
        ref_dec = build_sam3d("memsam_tiny_student").mask_decoder.double()
        ref_dec.load_state_dict(dec.state_dict())
        with torch.inference_mode():
            return ref_dec.upscale_to_masks(tokens.double(), hyper.double(), 8)

    ref = reference()
    with torch.inference_mode():
        exact = dec.upscale_to_masks(tokens, hyper, 8)
        low = dec.upscale_to_masks(tokens, hyper, 8, torch.bfloat16)
    assert low.dtype == torch.float32 and low.shape == ref.shape
    assert (exact.double() - ref).abs().max().item() < 1e-5
    err = (low.double() - ref).abs().max().item()
    assert 1e-4 < err < 0.02 * ref.abs().max().item()
    # A weight changed in place after the bf16 pack was made must not be served from the stale pack.
    with torch.no_grad():
        dec.output_upscaling[3].weight.mul_(-1)
    ref = reference()
    with torch.inference_mode():
        low = dec.upscale_to_masks(tokens, hyper, 8, torch.bfloat16)
    assert (low.double() - ref).abs().max().item() < 0.02 * ref.abs().max().item()
    # training (autograd on) takes the unchunked, unpacked path in bf16
    low_grad = dec.upscale_to_masks(tokens, hyper, 8, torch.bfloat16)
    assert low_grad.requires_grad and (low_grad.double() - ref).abs().max().item() < 0.02 * ref.abs().max().item()


def test_packed_inference_matches_plain_and_follows_weight_changes():
    torch.manual_seed(5)
    m = build_sam3d("memsam_tiny_student").eval()
    x = torch.randn(1, 1, 64, 64, 64)
    pts, lab = torch.tensor([[[30, 31, 32]]]), torch.tensor([[1]])
    with torch.inference_mode():
        emb = m.encode(x)
        low, _ = m.decode(emb, pts, lab)
    m.prepare_for_inference()
    with torch.inference_mode():
        emb_p = m.encode(x)
        low_p, _ = m.decode(emb_p, pts, lab)
    assert (emb - emb_p).abs().max() < 1e-4 and (low - low_p).abs().max() < 1e-4
    # An in-place weight change after packing must not be ignored by a stale packed copy.
    with torch.no_grad():
        m.image_encoder.blocks[0].mlp.lin1.weight.mul_(2)
        m.mask_decoder.output_upscaling[3].weight.mul_(2)
    with torch.inference_mode():
        emb2 = m.encode(x)
        low2, _ = m.decode(emb2, pts, lab)
    m2 = build_sam3d("memsam_tiny_student").eval()
    m2.load_state_dict(m.state_dict())
    with torch.inference_mode():
        emb_ref = m2.encode(x)
        low_ref, _ = m2.decode(emb_ref, pts, lab)
    assert (emb2 - emb_ref).abs().max() < 1e-4 and (low2 - low_ref).abs().max() < 1e-4
    assert (emb2 - emb).abs().max() > 1e-3


@pytest.mark.parametrize("tokens", [3, 30])
def test_absorbed_cross_attention_equals_literal(tokens):
    from MemorizingSAMLib.modeling.transformer import DecoderAttention

    torch.manual_seed(6)
    att = DecoderAttention(48, 4, downsample_rate=2).double()
    tok = torch.randn(2, tokens, 48, dtype=torch.float64)
    img = torch.randn(2, 64, 48, dtype=torch.float64)
    img2 = torch.randn(2, 64, 48, dtype=torch.float64)
    assert torch.allclose(att.tokens_to_image(tok, img, img2), att(tok, img, img2), atol=1e-12)
    assert torch.allclose(att.image_to_tokens(img, tok, tok * 2), att(img, tok, tok * 2), atol=1e-12)


def literal_decoder_reference(m, emb, pts, lab, mask, multimask):
    """The decoder as upstream writes it: dense prompt added to the embedding, every attention in its literal
    form, all tokens through the final attention (no precomputation, no absorption, no row selection)."""
    from MemorizingSAMLib.modeling.transformer import DecoderAttention

    dec = m.mask_decoder
    sparse, dense = m.prompt_encoder((pts, lab), None, mask)
    out_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
    tokens = torch.cat([out_tokens[None], sparse], dim=1)
    src = (emb + dense).flatten(2).transpose(1, 2)
    pos = m.prompt_encoder.get_dense_pe().flatten(2).transpose(1, 2)
    attn = DecoderAttention.forward
    queries, keys = tokens, src
    for i, layer in enumerate(dec.transformer.layers):
        if i == 0:
            queries = layer.self_attn(queries, queries, queries)
        else:
            q = queries + tokens
            queries = queries + attn(layer.self_attn, q, q, queries)
        queries = layer.norm1(queries)
        q, k = queries + tokens, keys + pos
        queries = layer.norm2(queries + attn(layer.cross_attn_token_to_image, q, k, keys))
        queries = layer.norm3(queries + layer.mlp(queries))
        q, k = queries + tokens, keys + pos
        keys = layer.norm4(keys + attn(layer.cross_attn_image_to_token, k, q, queries))
    t = dec.transformer
    q, k = queries + tokens, keys + pos
    hs = t.norm_final_attn(queries + attn(t.final_attn_token_to_image, q, k, keys))
    g = emb.shape[-1]
    x = keys.transpose(1, 2).reshape(1, -1, g, g, g)
    for layer in dec.output_upscaling:
        x = layer(x)
    sel = range(1, dec.num_mask_tokens) if multimask else range(1)
    hyper = torch.stack([dec.output_hypernetworks_mlps[i](hs[:, 1 + i]) for i in sel], dim=1)
    masks = torch.einsum("bmc,bcxyz->bmxyz", hyper, x)
    iou = dec.iou_prediction_head(hs[:, 0])
    return masks, iou[:, 1:] if multimask else iou[:, :1]


@pytest.mark.parametrize("clicks", [1, 12, 25])
@pytest.mark.parametrize("multimask", [False, True])
def test_prepared_embedding_decoding_equals_the_literal_decoder(clicks, multimask):
    """The click path (prepared embedding: precomputed first-block projections with the rank-m mask update,
    absorbed attentions, final attention for the read tokens only) against the literal decoder, in float64."""
    torch.manual_seed(7)
    m = build_sam3d("memsam_tiny_student").double().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    g = torch.Generator().manual_seed(clicks)
    emb = torch.randn(1, 96, 8, 8, 8, generator=g, dtype=torch.float64)
    pts = torch.rand(1, clicks, 3, generator=g, dtype=torch.float64) * 63
    lab = (torch.rand(1, clicks, generator=g) > 0.3).long()
    mask = torch.randn(1, 1, 32, 32, 32, generator=g, dtype=torch.float64) * 4
    with torch.no_grad():
        ref, ref_iou = literal_decoder_reference(m, emb, pts, lab, mask, multimask)
        prep = m.prepare_embedding(emb)
        for e in (emb, prep):
            low, iou = m.decode(e, pts, lab, mask, multimask_output=multimask)
            torch.testing.assert_close(low, ref, rtol=0, atol=1e-10)
            torch.testing.assert_close(iou, ref_iou, rtol=0, atol=1e-10)
            # the click path's decode without the IoU token's work: same logits, no IoU
            low, iou = m.decode(e, pts, lab, mask, multimask_output=multimask, iou=False)
            assert iou is None
            torch.testing.assert_close(low, ref, rtol=0, atol=1e-10)
        # without a mask prompt the prepared embedding falls back to the plain path
        torch.testing.assert_close(m.decode(prep, pts, lab)[0], m.decode(emb, pts, lab)[0], rtol=0, atol=1e-12)


def test_bfloat16_products_decode_close_to_the_literal_decoder():
    """decode(product_dtype=torch.bfloat16): the products with the image tokens (cross-attentions, upscaling) in
    bf16, on the plain and the prepared (click path) embedding: logits within 2 % of their range of the float64
    literal decoder, and the transformer's image-side products really reduced (not only the upscaling)."""
    torch.manual_seed(8)
    m = build_sam3d("memsam_tiny_student").eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(1, 96, 8, 8, 8, generator=g)
    pts = torch.rand(1, 6, 3, generator=g) * 63
    lab = (torch.rand(1, 6, generator=g) > 0.3).long()
    mask = torch.randn(1, 1, 32, 32, 32, generator=g) * 4
    m64 = build_sam3d("memsam_tiny_student").double().eval()
    m64.load_state_dict(m.state_dict())
    with torch.no_grad():
        ref, _ = literal_decoder_reference(m64, emb.double(), pts.double(), lab, mask.double(), False)
    scale = ref.abs().max().item()
    m.prepare_for_inference()
    with torch.inference_mode():
        prep = m.prepare_embedding(emb)
        for e in (emb, prep):
            exact, _ = m.decode(e, pts, lab, mask, iou=False)
            low, _ = m.decode(e, pts, lab, mask, iou=False, product_dtype=torch.bfloat16)
            assert (exact.double() - ref).abs().max().item() < 1e-4 * scale
            err = (low.double() - ref).abs().max().item()
            assert 1e-4 * scale < err < 0.02 * scale
        # the two-way transformer alone: its image-token output moves under bf16 products
        tr = m.mask_decoder.transformer
        src = torch.randn(1, 512, 96, generator=g)
        pos = torch.randn(1, 512, 96, generator=g)
        tok = torch.randn(1, 11, 96, generator=g)
        q0, k0 = tr(src, pos, tok)
        q1, k1 = tr(src, pos, tok, product_dtype=torch.bfloat16)
        for a, b in ((q0, q1), (k0, k1)):
            d = (a - b).abs().max().item()
            assert 1e-5 < d < 0.05 * a.abs().max().item()
