"""One place knows what the CPU can do: without native bf16 (an AVX2-only CPU, or one told to act like it), bf16
work falls back to ATen's generic kernels instead of dying in oneDNN, and callers that chose bf16 for speed are
told. The fallback runs on every machine (forced in a subprocess); the native path only where the CPU has it."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from MemorizingSAMLib.capabilities import RELEVANT_FLAGS, capabilities, native_bf16
from MemorizingSAMLib.modeling import build_sam3d
from MemorizingSAMLib.modeling.packed_linear import ensure_packed

AVX2_ONLY = {"MEMSAM_CPU_BF16": "0", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def test_capabilities_describe_this_machine():
    caps = capabilities()
    assert set(caps.flags) <= set(RELEVANT_FLAGS) and caps.aten_isa
    assert caps.to_json()["onednn_bf16"] == caps.onednn_bf16 == native_bf16("cpu")
    assert native_bf16("cuda")  # left to torch on a GPU


def test_bf16_falls_back_without_native_support(tmp_path):
    """As on an AVX2-only CPU: no bf16 packs, bf16 decodes and bf16 models still run (close to exact), and a
    session asked for bf16 products says it is slower here."""
    code = textwrap.dedent(
        """
        import warnings, torch
        from MemorizingSAMLib.capabilities import capabilities
        from MemorizingSAMLib.modeling import build_sam3d
        from MemorizingSAMLib.modeling.packed_linear import ensure_packed
        from MemorizingSAMLib.session import InteractiveSession, SessionOptions
        assert not capabilities().onednn_bf16, capabilities()
        torch.manual_seed(0)
        m = build_sam3d("memsam_tiny_student").eval().prepare_for_inference()
        lin = m.mask_decoder.transformer.layers[0].mlp.lin1
        assert not ensure_packed(lin, lin.weight, 16, torch.bfloat16)
        emb = m.encode(torch.randn(1, 1, 64, 64, 64))
        pts, lab = torch.tensor([[[30.0, 31.0, 32.0]]]), torch.tensor([[1]])
        with torch.inference_mode():
            exact, _ = m.decode(emb, pts, lab)
            low, _ = m.decode(emb, pts, lab, product_dtype=torch.bfloat16)
        err = (exact - low).abs().max().item()
        assert 0 < err < 0.05 * exact.abs().max().item(), err
        b = build_sam3d("memsam_tiny_student").to(torch.bfloat16).eval().prepare_for_inference()
        with torch.inference_mode():
            out, _ = b.decode(b.encode(torch.randn(1, 1, 64, 64, 64, dtype=torch.bfloat16)), pts.bfloat16(), lab)
        assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            InteractiveSession(m, SessionOptions(product_dtype="bfloat16"))
        assert any("no native bf16" in str(x.message) for x in w), [str(x.message) for x in w]
        print("ok")
        """
    )
    env = {**os.environ, **AVX2_ONLY}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


@pytest.mark.skipif(
    not native_bf16("cpu"), reason="this CPU has no native bf16 (oneDNN needs AVX-512 BW/VL/DQ, AVX-NE-CONVERT or AMX)"
)
def test_native_bf16_packs_weights():
    m = build_sam3d("memsam_tiny_student").eval()
    lin = m.mask_decoder.transformer.layers[0].mlp.lin1
    assert ensure_packed(lin, lin.weight, 16, torch.bfloat16)
