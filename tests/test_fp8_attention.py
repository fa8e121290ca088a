"""The fp8_attention option: options → planner → SiteSpec → a kernel's FP8 path (Triton here), with one
clear error wherever it cannot run (a kernel without an FP8 path, rows rectification, hardware
without e4m3 tensor cores). On a CPU-only machine the kernel runs in Triton's interpreter."""
import pytest
import torch
from support import DEVICE, SelfAttention, Wrapper, needs_fp8, raises_from_backend, rel_err

import compact_compile
from compact_compile.errors import OptionsError
from compact_compile.kernels import fp8 as fp8_module
from compact_compile.kernels.registry import choose_kernel
from compact_compile.kernels.triton_sparse import triton_available
from compact_compile.options import CompactOptions

GRID = (2, 8, 8)   # 128 tokens; tile (1, 8, 8) = one 64-token block per frame
# Inductor compiles on the GPU only: on the CPU it would spend minutes of C++ compilation on a tiny model
INNERS = [("window", False, "aot_eager"), ("window", True, "eager"), ("dynamic", True, "aot_eager"),
          ("dense", False, "eager")] + ([("window", True, "inductor")] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("options, match", [
    (dict(fp8_attention=1), "must be True or False"),
    (dict(fp8_attention=True, kernel="flex"), "kernel='flex' has no FP8"),
    (dict(fp8_attention=True, rectify="rows"), "rectifies per block"),
])
def test_options_refuse_what_cannot_run_fp8(options, match):
    with pytest.raises(OptionsError, match=match):
        CompactOptions.from_dict(options)


def test_refused_below_compute_capability_8_9(monkeypatch):
    """An A100 (8.0) has no e4m3 tensor cores: one OptionsError naming its capability."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(OptionsError, match=r"A100 has compute capability 8\.0; e4m3 tensor cores need ≥ 8\.9"):
        choose_kernel("auto", "cuda", torch.bfloat16, 64, 64, fp8=True)


def test_blocks_under_32_tokens_are_refused_with_the_reason(monkeypatch):
    """A plan of 16-token blocks (a hand-made plan file: the options take 64 or 128) cannot run FP8:
    one OptionsError at compile time naming the block size, not a GPU compile error at the first call."""
    monkeypatch.setattr(fp8_module, "fp8_unsupported", lambda device: "")
    with pytest.raises(OptionsError, match=r"block size 16: P·V's K is the key tile, and e4m3 dots need K ≥ 32"):
        choose_kernel("auto", DEVICE, torch.bfloat16, 64, 16, fp8=True)


def test_auto_chooses_triton_and_says_why(monkeypatch):
    monkeypatch.setattr(fp8_module, "fp8_unsupported", lambda device: "")
    if not triton_available(DEVICE):
        pytest.skip("needs a CUDA GPU or TRITON_INTERPRET=1")
    name, why = choose_kernel("auto", DEVICE, torch.bfloat16, 64, 64, fp8=True)
    assert name == "triton" and "the fastest FP8 (e4m3) path here" in why and "fa4: " in why


@pytest.mark.parametrize("head_dim, key_mask, option, want", [
    (128, False, "auto", "fa4"), (128, True, "auto", "fa4"), (64, False, "auto", "triton"),
    (64, True, "auto", "triton"), (128, False, "triton", "triton")])
def test_fp8_takes_fa4_where_its_path_runs(monkeypatch, head_dim, key_mask, option, want):
    """With FA4 installed (pretended here) its FP8 path is preferred for head dim 128, key mask or not;
    Triton's takes the rest, and an explicitly named kernel is kept."""
    from compact_compile.kernels import fa4
    from compact_compile.kernels.fa4 import FA4Kernel

    monkeypatch.setattr(fp8_module, "fp8_unsupported", lambda device: "")
    monkeypatch.setattr(FA4Kernel, "unsupported", staticmethod(lambda *a, **k: ""))
    monkeypatch.setattr(fa4, "_fa4_version", lambda: fa4.FP8_BUILT_ON)
    if want == "triton" and not triton_available(DEVICE):
        pytest.skip("needs a CUDA GPU or TRITON_INTERPRET=1")
    name, why = choose_kernel(option, DEVICE, torch.bfloat16, head_dim, 128, key_mask=key_mask, fp8=True)
    assert name == want, why
    if want == "triton" and option == "auto":
        assert "head dim 64" in why


def test_fa4s_fp8_path_needs_the_fa4_release_it_is_built_on(monkeypatch):
    """Another flash-attn-4 could run FA4's own softmax without the FP8 scales: refused, with the
    version, and "auto" takes Triton's FP8 path; an explicit kernel='fa4' is one error with a hint."""
    from compact_compile.kernels import fa4
    from compact_compile.kernels.fa4 import FA4Kernel

    monkeypatch.setattr(fp8_module, "fp8_unsupported", lambda device: "")
    monkeypatch.setattr(FA4Kernel, "unsupported", staticmethod(lambda *a, **k: ""))
    monkeypatch.setattr(fa4, "_fa4_version", lambda: "4.1.0")
    with pytest.raises(OptionsError, match=r"flash-attn-4 4\.1\.0 installed.*kernel='auto' takes the first"):
        choose_kernel("fa4", DEVICE, torch.bfloat16, 128, 128, fp8=True)
    if triton_available(DEVICE):
        name, why = choose_kernel("auto", DEVICE, torch.bfloat16, 128, 128, fp8=True)
        assert name == "triton" and "flash-attn-4 4.1.0" in why


@needs_fp8
def test_an_fp8_kernel_without_the_fused_epilogue_gets_rectification_merged_by_the_site(monkeypatch):
    """FA4's FP8 path has no rectification epilogue (the Triton kernel fuses R·O + Ō): the site merges
    it after the kernel. FA4 is stood in for here by the Triton FP8 path called without the epilogue;
    the result equals the fused one but for the output's rounding, and rectification is not a no-op."""
    from compact_compile.kernels import fa4
    from compact_compile.kernels.fa4 import FA4Kernel
    from compact_compile.kernels.triton_sparse import TritonKernel

    calls = []

    def attend_fp8(self, tiles, prepared, scale, dtype, key_valid=None, rectify=None):
        calls.append(rectify)
        return TritonKernel.attend_fp8(self, tiles, prepared, scale, dtype)

    monkeypatch.setattr(FA4Kernel, "unsupported", staticmethod(lambda *a, **k: ""))
    monkeypatch.setattr(fa4, "_fa4_version", lambda: fa4.FP8_BUILT_ON)
    monkeypatch.setattr(FA4Kernel, "prepare", TritonKernel.prepare)
    monkeypatch.setattr(FA4Kernel, "attend_fp8", attend_fp8)
    monkeypatch.setattr(FA4Kernel, "text_blocks", 0, raising=False)
    torch.manual_seed(0)
    model = Wrapper(SelfAttention(dim=2 * 128, heads=2)).eval().to(DEVICE, torch.bfloat16)
    # a common offset and one per frame: block means the GAPR test trusts, and a skipped frame unlike the
    # kept one (N(0, 1) tokens alone leave R = 1, Ō = 0: nothing would be merged)
    frames = 0.5 * torch.randn(2, 1, 256).repeat_interleave(64, 0).view(1, 128, 256)
    x = (0.3 * torch.randn(1, 128, 256) + torch.randn(256) + frames).to(DEVICE, torch.bfloat16)
    outs = {}
    with torch.no_grad():
        for kernel, rectify in (("auto", True), ("triton", True), ("triton", False)):
            torch._dynamo.reset()
            compact_compile.report(clear=True)
            options = dict(plan="window", window=(1, 1, 1), grid=GRID, tile=(1, 8, 8), block_size=64, rectify=rectify,
                           kernel=kernel, fp8_attention=True, inner="eager")
            outs[kernel, rectify] = torch.compile(model, backend="compact", options=options)(x)
            if kernel == "auto":
                [site] = compact_compile.report().sites
                assert site["kernel"] == "fa4" and site["fp8"], site["kernel_reason"]
    assert calls and all(r is None for r in calls)
    assert rel_err(outs["triton", True], outs["triton", False]) > 0.05          # rectification matters here
    assert rel_err(outs["auto", True], outs["triton", True]) < 0.01


@needs_fp8
@pytest.mark.parametrize("plan, rectify, inner", INNERS)
def test_compiled_site_runs_fp8_close_to_its_dtype(plan, rectify, inner, monkeypatch):
    """Static and dynamic plans, rectified or not: the rewritten site runs the FP8 op, within FP8's
    error of the same site in bf16 (N(0, 1)-like activations: a few percent). A site dense at every
    step (plan "dense") is not made FP8, says why, and equals the bf16 site. The Triton choice and
    estimate see the inputs' dtype at both sites (it sets their dots' precision on the GPU)."""
    from compact_compile.kernels import site as site_module
    seen = []
    choose = site_module.choose_triton
    monkeypatch.setattr(site_module, "choose_triton", lambda pools, k, *a, **kw: seen.append(k.dtype) or
                        choose(pools, k, *a, **kw))
    torch.manual_seed(0)
    model = Wrapper(SelfAttention(dim=2 * 64, heads=2)).eval().to(DEVICE, torch.bfloat16)
    x = torch.randn(1, 128, 128, dtype=torch.bfloat16, device=DEVICE)
    options = dict(plan=plan, window=(1, 1, 1), grid=GRID, tile=(1, 8, 8), block_size=64, rectify=rectify,
                   kernel="triton", inner=inner)
    with torch.no_grad():
        ref = torch.compile(model, backend="compact", options=options)(x)
        bf16_seen, seen[:] = list(seen), []
        torch._dynamo.reset()
        compact_compile.report(clear=True)
        out = torch.compile(model, backend="compact", options=dict(options, fp8_attention=True))(x)
    assert seen == bf16_seen and set(seen) <= {torch.bfloat16}
    [site] = compact_compile.report().sites
    if plan == "dense":
        assert not site["fp8"] and "no FP8: this site computes every block at every step" in site["kernel_reason"]
        assert torch.equal(out, ref) and "fp8" not in str(compact_compile.report())
        return
    assert site["kernel"] == "triton" and site["fp8"] and "FP8" in site["kernel_reason"]
    assert "triton fp8" in str(compact_compile.report())
    assert compact_compile.report().gained().endswith("; 1 of them in FP8 (e4m3) at their sparse steps")
    assert rel_err(out, ref) < 0.08


@needs_fp8
def test_a_site_dense_at_every_step_runs_whatever_fp8_could_not_take():
    """Head dim 16 cannot run FP8 (e4m3 dots need K ≥ 32), but plan "dense" never runs it there: the
    site runs dense in its dtype, says why, and is not refused."""
    model = Wrapper(SelfAttention(dim=2 * 16, heads=2)).eval().to(DEVICE, torch.bfloat16)
    x = torch.randn(1, 128, 32, dtype=torch.bfloat16, device=DEVICE)
    options = dict(plan="dense", grid=GRID, tile=(1, 8, 8), block_size=64, kernel="triton", inner="eager",
                   fp8_attention=True)
    with torch.no_grad():
        out = torch.compile(model, backend="compact", options=options)(x)
        ref = model(x)
    [site] = compact_compile.report().sites
    assert site["rewritten"] and not site["fp8"] and "no FP8" in site["kernel_reason"]
    assert rel_err(out, ref) < 1e-2


class KeyMaskedAttention(torch.nn.Module):
    """Self-attention over the video tokens with a key-padding mask `[B, 1, 1, S]` (keys excluded
    inside every block, not only text)."""

    def __init__(self, dim: int = 128, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)

    def forward(self, x, key_mask):
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
        return o.transpose(1, 2).flatten(2)


def fa4_fp8_here() -> bool:
    from compact_compile.kernels.fa4 import _fp8_refusal
    return DEVICE == "cuda" and not _fp8_refusal(torch.device(DEVICE), torch.bfloat16, 128, 128)


@needs_fp8
@pytest.mark.parametrize("rectify", [False, True])
@pytest.mark.parametrize("padding", ["plain", "outliers"])
@pytest.mark.parametrize("kernel, block, heads", [
    ("triton", 64, 2),
    pytest.param("fa4", 128, 1, marks=pytest.mark.skipif(not fa4_fp8_here(), reason="needs FA4's FP8 path (sm90)"))])
def test_fp8_site_honours_a_key_mask(rectify, padding, kernel, block, heads):
    """The key mask reaches the FP8 op: its output is within FP8's error of float64 attention over the
    plan's blocks and the kept keys, while ignoring the mask would be 10× further off. With padding
    tokens far off in one direction ("outliers"), k's mean over every token would carry their offset
    into the kept keys' quantization (0.22 off): smoothing takes the mean over the kept keys only.
    Two frames of one block each: 64 tokens on Triton (head dim 64), 128 on FA4 (head dim 128)."""
    torch.manual_seed(0)
    model = KeyMaskedAttention(heads=heads).eval().to(DEVICE, torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    S = 2 * block
    x = torch.randn(2, S, 128, generator=g)
    key_mask = torch.rand(2, S, generator=g) < 0.6
    key_mask[:, 0] = True
    if padding == "outliers":
        x[~key_mask] += 30 * torch.randn(128, generator=g)
    x, key_mask = x.to(DEVICE, torch.bfloat16), key_mask.to(DEVICE)
    options = dict(plan="window", window=(1, 1, 1), grid=(2, 8, block // 8), tile=(1, 8, block // 8),
                   block_size=block, rectify=rectify, kernel=kernel, inner="eager", fp8_attention=True, dense_steps=0)
    compact_compile.report(clear=True)
    with torch.no_grad():
        out = torch.compile(model, backend="compact", options=options)(x, key_mask)
        q, k, v = (t.double() for t in model.qkv(x).unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4))
    [site] = compact_compile.report().sites
    assert site["rewritten"] and site["key_mask"] and "FP8" in site["kernel_reason"]
    assert site["kernel"].startswith(kernel), site["kernel"]
    blocks = torch.eye(2, dtype=torch.bool, device=DEVICE).repeat_interleave(block, 0).repeat_interleave(block, 1)
    sdpa = torch.nn.functional.scaled_dot_product_attention   # window (1, 1, 1): each frame's block alone
    want = sdpa(q, k, v, attn_mask=blocks & key_mask[:, None, None, :]).transpose(1, 2).flatten(2)
    ignored = sdpa(q, k, v, attn_mask=blocks).transpose(1, 2).flatten(2)
    kept = key_mask[..., None]     # the outlier tokens' own queries (not what this is about) left out
    assert rel_err(out * kept, want * kept) < 0.05 and rel_err(ignored, want) > 0.5


@needs_fp8
@pytest.mark.parametrize("rectify", [False, True])
def test_fp8_runs_hunyuans_joint_sites_with_their_prompt_masks(rectify):
    """HunyuanVideo's joint text+video sites (the text after the video, the prompt's key-padding mask,
    two prompt lengths), rectified or not: every joint site runs the FP8 op, and the model's output
    is within FP8's error of the same model with bf16 sparse attention."""
    from support import tiny_hunyuan

    from compact_compile.passes.sites import JOINT

    model, inputs = tiny_hunyuan(lengths=(5, 12), head_dim=32)
    model = model.to(DEVICE, torch.bfloat16)
    inputs = {k: v.to(DEVICE, torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else
              v.to(DEVICE) if torch.is_tensor(v) else v for k, v in inputs.items()}
    options = dict(plan="window", window=(1, 3, 3), block_size=64, rectify=rectify, kernel="triton",
                   inner="eager", dense_steps=0)
    with torch.no_grad():
        ref = torch.compile(model, backend="compact", options=options)(**inputs)[0]
        torch._dynamo.reset()
        compact_compile.report(clear=True)
        out = torch.compile(model, backend="compact", options=dict(options, fp8_attention=True))(**inputs)[0]
    joint = [s for s in compact_compile.report().sites if s["kind"] == JOINT]
    assert joint and all(s["rewritten"] and s["key_mask"] and "FP8" in s["kernel_reason"] for s in joint)
    assert rel_err(out, ref) < 0.08


@needs_fp8
def test_fp8_follows_a_plans_step_schedule(monkeypatch):
    """A plan with a schedule (dense first, then one mask per step range, a calibrated plan's form)
    runs each range's mask in FP8: at every step the output is within FP8's error of float64 attention
    over that step's blocks, and the ranges' references are far apart (a range run with the other's
    mask, or densely, fails). The dense (warm-up) step runs in the inputs' dtype, not FP8: within
    bf16's error of exact dense attention, and without the quantizing pass, whose tiles it never reads."""
    from compact_compile.kernels import ops
    from compact_compile.plan import Plan, SitePlan
    from compact_compile.schedule import at_step, make_schedule

    passes = []
    quantize = ops.tile_quantized
    monkeypatch.setattr(ops, "tile_quantized", lambda *a, **kw: passes.append(1) or quantize(*a, **kw))

    grid = (4, 8, 8)                       # 4 frames of 64 tokens: tile (1, 8, 8), one block per frame
    eye = torch.eye(4, dtype=torch.bool)
    early, late = eye, eye | eye.roll(1, 0)
    plan = Plan(grid, (1, 8, 8), 64, {"attn": SitePlan(2, 64, 256, 0, 0, early[None]),
                                       "attn@3": SitePlan(2, 64, 256, 0, 0, late[None])})
    plan.info["schedule"] = make_schedule(1, [(1, 3), (3, None)])
    torch.manual_seed(0)
    model = Wrapper(SelfAttention(dim=2 * 64, heads=2)).eval().to(DEVICE, torch.bfloat16)
    x = torch.randn(1, 256, 128, generator=torch.Generator().manual_seed(1)).to(DEVICE, torch.bfloat16)
    compiled = torch.compile(model, backend="compact", options=dict(plan=plan, kernel="triton", inner="eager",
                                                                    rectify=False, fp8_attention=True))
    attn = model.attn
    with torch.no_grad():
        q, k, v = (t.double() for t in attn.qkv(x).unflatten(-1, (3, 2, -1)).permute(2, 0, 3, 1, 4))

        def reference(blocks):
            mask = blocks.repeat_interleave(64, 0).repeat_interleave(64, 1).to(DEVICE)
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            return torch.nn.functional.linear(o.transpose(1, 2).flatten(2), attn.out.weight.double(),
                                              attn.out.bias.double())

        refs = {"dense": reference(torch.ones(4, 4, dtype=torch.bool)), "early": reference(early),
                "late": reference(late)}
        for step, want in ((0, "dense"), (1, "early"), (2, "early"), (5, "late")):
            passes.clear()
            with at_step(step):
                out = compiled(x)
            assert rel_err(out, refs[want]) < (0.01 if want == "dense" else 0.05), (step, want)
            assert len(passes) == (want != "dense"), (step, len(passes))
            assert all(rel_err(refs[other], refs[want]) > 0.2 for other in refs if other != want)
    [site] = compact_compile.report().sites
    assert "FP8" in site["kernel_reason"]


def test_refused_on_cpu_without_the_interpreter(monkeypatch):
    from compact_compile.kernels import triton_sparse
    monkeypatch.setattr(triton_sparse, "INTERPRET", False)
    model = Wrapper(SelfAttention(dim=2 * 64, heads=2)).eval()
    options = dict(plan="window", grid=GRID, tile=(1, 8, 8), block_size=64, fp8_attention=True, inner="eager")
    with raises_from_backend(OptionsError, "no e4m3 tensor cores on cpu"), torch.no_grad():
        torch.compile(model, backend="compact", options=options)(torch.randn(1, 128, 128))
