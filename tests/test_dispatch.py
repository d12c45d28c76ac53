import pytest

from gems import dispatch
from gems.errors import BackendUnavailableError


def test_auto_is_torch_on_cpu_and_env_overrides(monkeypatch):
    assert dispatch.resolve_backend("auto", device_type="cpu") == "torch"
    monkeypatch.setenv("GEMS_BACKEND", "torch")
    assert dispatch.resolve_backend(None, device_type="cuda") == "torch"
    with pytest.raises(ValueError):
        dispatch.resolve_backend("tpu", device_type="cpu")


def test_unavailable_explicit_backend_raises_with_reason(monkeypatch):
    monkeypatch.setattr(dispatch, "_probe", lambda name: (False, "no GPU here") if name != "torch" else (True, ""))
    with pytest.raises(BackendUnavailableError, match="no GPU here"):
        dispatch.resolve_backend("cuda", device_type="cuda")
    assert dispatch.resolve_backend("auto", device_type="cuda") == "torch"


def test_auto_prefers_prebuilt_cuda_then_triton(monkeypatch):
    answers = {"cuda": (True, "prebuilt extension gems._C"), "triton": (True, "")}
    monkeypatch.setattr(dispatch, "_probe", lambda name: answers.get(name, (True, "")))
    assert dispatch.resolve_backend("auto", device_type="cuda") == "cuda"
    answers["cuda"] = (True, "just-in-time build with nvcc")
    assert dispatch.resolve_backend("auto", device_type="cuda") == "triton"


def test_auto_keeps_large_weights_off_triton():
    """backend="auto" runs Triton only where its fused step was measured faster than torch (small m·n·R)."""
    import torch

    small, large = (576, 1536), (4096, 4096)
    assert dispatch.auto_backend_for("triton", small, torch.float32, 128) == "triton"
    assert dispatch.auto_backend_for("triton", small, torch.float32, 1024) == "torch"
    assert dispatch.auto_backend_for("triton", small, torch.bfloat16, 1024) == "triton"
    assert dispatch.auto_backend_for("triton", (2048, 2048), torch.bfloat16, 512) == "torch"
    assert dispatch.auto_backend_for("triton", large, torch.float16, 128) == "torch"
    assert dispatch.auto_backend_for("torch", large, torch.bfloat16, 1024) == "torch"


def test_auto_keeps_half_precision_high_rank_weights_off_cuda():
    """With the prebuilt CUDA extension, "auto" keeps it for every fp32 weight and for bf16/fp16 weights below
    the measured (total rank, m·n) corners: R ≥ 1024, or R ≥ 512 on 4096²-sized weights and larger."""
    import torch

    for shape in ((576, 1536), (4096, 11008)):
        assert dispatch.auto_backend_for("cuda", shape, torch.float32, 1024) == "cuda"
        assert dispatch.auto_backend_for("cuda", shape, torch.bfloat16, 128) == "cuda"
        assert dispatch.auto_backend_for("cuda", shape, torch.float16, 1024) == "torch"
    assert dispatch.auto_backend_for("cuda", (2048, 2048), torch.bfloat16, 512) == "cuda"
    assert dispatch.auto_backend_for("cuda", (4096, 4096), torch.bfloat16, 512) == "torch"


def test_bench_step_auto_check_compares_auto_with_the_faster_provider(monkeypatch):
    """bench_step.py --check-auto: for each measured configuration, auto's pick against the faster of the kernel
    and torch (rows as read back from a results CSV: strings), and interpreter rows ignored."""
    from pathlib import Path

    benches = Path(__file__).resolve().parents[1] / "benches"
    monkeypatch.syspath_prepend(str(benches))
    import bench_step

    def row(provider, shape, ranks, dtype, ms, note=""):
        return dict(provider=provider, shape=shape, ranks=ranks, dtype=dtype, ms=str(ms), note=note)

    rows = [row("torch", "576x1536", "64/32", "fp32", 0.8), row("triton", "576x1536", "64/32", "fp32", 0.5),
            row("torch", "4096x4096", "256/128", "fp32", 2.5), row("triton", "4096x4096", "256/128", "fp32", 2.0),
            row("triton", "64x48", "16/8", "fp32", 900.0, note="TRITON_INTERPRET=1 on CPU")]
    checks = {(c["kernel"], c["shape"]): c for c in bench_step.auto_check(rows)}
    assert set(checks) == {("triton", "576x1536"), ("triton", "4096x4096")}
    assert checks["triton", "576x1536"]["auto_pick"] == "triton" == checks["triton", "576x1536"]["faster"]
    big = checks["triton", "4096x4096"]  # m·n·R = 16.8e6·512 is past the fp32 limit: auto runs torch, here slower
    assert (big["auto_pick"], big["faster"], big["pick_vs_faster"]) == ("torch", "triton", 1.25)
