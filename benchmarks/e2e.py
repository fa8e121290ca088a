"""End to end on real-size diffusers video transformers (random weights: weights do not change
speed), bf16, one GPU: one forward and a short denoising loop per variant, same process, same inputs.

    python benchmarks/e2e.py wan1.3b [variant ...] [--steps 10 --dense-steps 2] [--profile variant ...]

Models: wan1.3b (Wan2.1-1.3B, 480p 81 frames, 32,760 tokens), wan14b (Wan2.1-14B, 720p 81 frames,
75,600 tokens), cogvideox5b (CogVideoX-5B, 720×480 49 frames, 17,550 video + 226 text tokens in
joint attention), hunyuan13b (HunyuanVideo 13B, 720×1280 33 frames, 32,400 video + 256 text tokens
with a key-padding mask; hunyuan13b-129f: the same at 129 frames, 118,800 video tokens), mochi10b (Mochi 10B, 480×848 85 frames, 23,850 video + 256 text tokens,
prompt padding as a key mask through compact_compile.models). Variants: see VARIANTS; "-regional"
ones compile the repeated transformer blocks only (diffusers' compile_repeated_blocks, or each of
`transformer_blocks` for models without `_repeated_blocks`), the others the whole model.

Per variant: first-call seconds (compile, cold when TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 is set),
forward ms (do_bench median), denoising-loop seconds (`--steps` Euler steps on decreasing timesteps;
compact variants run the first `--dense-steps` steps dense through the `dense_steps` option), the
relative difference of the output to inductor-dense and to the same variant unquantized, and with
--profile the per-kernel CUDA time of one forward, grouped (attention / GEMM / other). --layers N
builds the model with N blocks of each kind (quick per-layer profiles).
Writes $OUT/e2e-<model>.json (e2e-<model>-Nlayers.json) after every variant, so a run stopped at its
time limit keeps its results.
"""
import argparse
import contextlib
import json
import os
import re
import time

import torch
import torch._inductor.config
import torch.nn.functional as F
import triton

import compact_compile
from compact_compile.options import BUILTIN_PLANS
from compact_compile.schedule import at_step
from timing import kernel_group, rel_diff

MODELS = {
    "wan1.3b": dict(cls="WanTransformer3DModel", window=(3, 3, 3), latent=(1, 16, 21, 60, 104), text=(1, 512, 4096),
                    config=dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                                out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
                                cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
                                rope_max_seq_len=1024)),
    "wan14b": dict(cls="WanTransformer3DModel", window=(3, 5, 5), latent=(1, 16, 21, 90, 160), text=(1, 512, 4096),
                   config=dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16,
                               out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40,
                               cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
                               rope_max_seq_len=1024)),
    "cogvideox5b": dict(cls="CogVideoXTransformer3DModel", window=(3, 3, 3), latent=(1, 13, 16, 60, 90),
                        text=(1, 226, 4096),
                        config=dict(num_attention_heads=48, attention_head_dim=64, in_channels=16, out_channels=16,
                                    time_embed_dim=512, text_embed_dim=4096, num_layers=42, sample_width=90,
                                    sample_height=60, sample_frames=49, patch_size=2, max_text_seq_length=226,
                                    use_rotary_positional_embeddings=True)),
    "hunyuan13b": dict(cls="HunyuanVideoTransformer3DModel", window=(3, 3, 3), latent=(1, 16, 9, 90, 160),
                       text=(1, 256, 4096), prompt_tokens=100,
                       config=dict(in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128,
                                   num_layers=20, num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0,
                                   patch_size=2, patch_size_t=1, qk_norm="rms_norm", guidance_embeds=True,
                                   text_embed_dim=4096, pooled_projection_dim=768, rope_theta=256.0,
                                   rope_axes_dim=(16, 56, 56))),
    # auto tile (2, 4, 16): window (3, 3, 3) computes 13.8% of the blocks, (1, 5, 5) 10.8% (~90% sparse)
    "mochi10b": dict(cls="MochiTransformer3DModel", window=(1, 5, 5), latent=(1, 12, 15, 60, 106),
                     text=(1, 256, 4096), prompt_tokens=100,
                     config=dict(patch_size=2, num_attention_heads=24, attention_head_dim=128, num_layers=48,
                                 pooled_projection_dim=1536, in_channels=12, text_embed_dim=4096, time_embed_dim=256,
                                 activation_fn="swiglu", max_sequence_length=256)),
}

# name → torch.compile keyword arguments (None: eager); "WINDOW" is replaced by the model's window
VARIANTS = {
    "eager": None,
    "inductor-dense": dict(backend="inductor"),
    "inductor-no-attention": dict(backend="inductor"),  # attention replaced by a free op: the floor
    "compact-no-attention-fp8": dict(backend="compact", options=dict(plan="dense", quantize="fp8")),  # fp8 floor
    "compact-dense-fp8": dict(backend="compact", options=dict(plan="dense", quantize="fp8")),
    "compact-window": dict(backend="compact", options=dict(plan="window", window="WINDOW")),
    "compact-window-flex": dict(backend="compact", options=dict(plan="window", window="WINDOW", kernel="flex")),
    "compact-window-fp8": dict(backend="compact", options=dict(plan="window", window="WINDOW", quantize="fp8")),
    "compact-window-int8": dict(backend="compact", options=dict(plan="window", window="WINDOW", quantize="int8")),
    "compact-window-rectify": dict(backend="compact", options=dict(plan="window", window="WINDOW", rectify=True)),
    "compact-dynamic-rectify": dict(backend="compact", options=dict(plan="dynamic", rectify=True)),
    "inductor-dense-regional": dict(backend="inductor"),
    "inductor-no-attention-regional": dict(backend="inductor"),
    "compact-no-attention-fp8-regional": dict(backend="compact", options=dict(plan="dense", quantize="fp8")),
    # every site rewritten, attention dense on the kernel's dense path (FA4's where installed): what
    # dense warm-up steps cost against Inductor's SDPA
    "compact-dense-regional": dict(backend="compact", options=dict(plan="dense")),
    "compact-dense-sdpa-regional": dict(backend="compact", options=dict(plan="dense", kernel="flex")),
    "compact-window-regional": dict(backend="compact", options=dict(plan="window", window="WINDOW")),
    "compact-window-rectify-regional": dict(backend="compact", options=dict(plan="window", window="WINDOW",
                                                                           rectify=True)),
    "compact-window-triton-regional": dict(backend="compact", options=dict(plan="window", window="WINDOW",
                                                                          kernel="triton")),
    "compact-window-rectify-triton-regional": dict(backend="compact", options=dict(
        plan="window", window="WINDOW", rectify=True, kernel="triton")),
    "compact-dynamic-regional": dict(backend="compact", options=dict(plan="dynamic")),
    "compact-dynamic-rectify-regional": dict(backend="compact", options=dict(plan="dynamic", rectify=True)),
    "compact-window-fp8-regional": dict(backend="compact",
                                        options=dict(plan="window", window="WINDOW", quantize="fp8")),
    # FP8 attention (issue #18), alone and with FP8 linears
    "compact-window-fp8attn-regional": dict(backend="compact",
                                            options=dict(plan="window", window="WINDOW", fp8_attention=True)),
    "compact-window-fp8attn-fp8-regional": dict(backend="compact", options=dict(
        plan="window", window="WINDOW", fp8_attention=True, quantize="fp8")),
}
# HunyuanVideo at 129 frames: 33×45×80 = 118,800 video tokens (+ 256 text)
MODELS["hunyuan13b-129f"] = dict(MODELS["hunyuan13b"], latent=(1, 16, 33, 90, 160))


def build(spec, device="cuda"):
    import diffusers

    torch.manual_seed(0)
    with torch.device(device):                 # random init on the device, directly in bf16
        torch.set_default_dtype(torch.bfloat16)
        try:
            model = getattr(diffusers, spec["cls"])(**spec["config"]).eval()
        finally:
            torch.set_default_dtype(torch.float32)
    x = torch.randn(spec["latent"], device=device, dtype=torch.bfloat16)
    text = torch.randn(spec["text"], device=device, dtype=torch.bfloat16)
    return model, x, text


def extra_inputs(spec, device="cuda"):
    """Model-specific inputs besides latent, timestep and text: a padded prompt's mask, pooled text,
    guidance (HunyuanVideo), CogVideoX's RoPE."""
    if "prompt_tokens" in spec:
        mask = (torch.arange(spec["text"][1], device=device) < spec["prompt_tokens"]).long()[None]
        extra = dict(encoder_attention_mask=mask)
        if spec["cls"] == "HunyuanVideoTransformer3DModel":
            extra.update(pooled_projections=torch.randn(1, spec["config"]["pooled_projection_dim"], device=device,
                                                        dtype=torch.bfloat16),
                         guidance=torch.tensor([6000.0], device=device, dtype=torch.bfloat16))
        return extra
    if spec["cls"] == "CogVideoXTransformer3DModel":
        return dict(image_rotary_emb=rotary(spec))
    return {}


def rotary(spec):
    """CogVideoX-5B's 3D RoPE, as its pipeline passes it (None for Wan, which makes its own)."""
    if spec["cls"] != "CogVideoXTransformer3DModel":
        return None
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    t, h, w = grid_of(spec)
    return get_3d_rotary_pos_embed(spec["config"]["attention_head_dim"], ((0, 0), (h, w)), (h, w), t, device="cuda")


def compiled(model, name, spec, dense_steps, variants=VARIANTS):
    """The model compiled as variant `name` of `variants`."""
    kwargs = variants[name]
    if kwargs is None:
        return model
    kwargs = json.loads(json.dumps(kwargs))
    options = kwargs.get("options")
    if options is not None:
        options.update({k: spec["window"] for k, v in options.items() if v == "WINDOW"})
        if options.get("plan", "window") in BUILTIN_PLANS:
            # given: the backend's default warm-up would make the timed step (pinned to `dense_steps`) dense;
            # a plan file carries its own schedule
            options["dense_steps"] = dense_steps
        if name.endswith("-regional"):  # the patch embedding and the timestep are outside the block graphs
            options["grid"] = grid_of(spec)
            compact_compile.follow_steps(model)
    if name.endswith("-regional"):
        if getattr(model, "_repeated_blocks", None):
            model.compile_repeated_blocks(dynamic=False, **kwargs)
        else:   # the same: every block compiled, one graph serving them all
            for block in model.transformer_blocks:
                block.compile(dynamic=False, **kwargs)
        return model
    return torch.compile(model, dynamic=False, **kwargs)


def grid_of(spec):
    cfg = spec["config"]
    if spec["cls"] == "WanTransformer3DModel":
        pt, ph, pw = cfg["patch_size"]
        _, _, t, h, w = spec["latent"]
        return (t // pt, h // ph, w // pw)
    if spec["cls"] == "CogVideoXTransformer3DModel":
        _, t, _, h, w = spec["latent"]
        return (t, h // cfg["patch_size"], w // cfg["patch_size"])
    _, _, t, h, w = spec["latent"]   # HunyuanVideo (temporal patch 1), Mochi
    return (t // cfg.get("patch_size_t", 1), h // cfg["patch_size"], w // cfg["patch_size"])


@torch.library.custom_op("bench::free_attention", mutates_args=())
def _free_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """No work, but an opaque consumer of q, k and v: returning the query itself let Inductor drop the
    key and value projections and the key's norm and RoPE as dead code (15 GEMMs' worth of the
    Wan-1.3B forward, measured 2026-11-30), so the floor sat below what the rest of the model costs."""
    return torch.zeros_like(query)


@_free_attention.register_fake
def _(query, key, value):
    return torch.empty_like(query)


@contextlib.contextmanager
def free_attention(enabled):
    """SDPA replaced by an op that costs nothing (a memset) and keeps q, k, v alive: the floor, what
    the rest of the model costs."""
    original = F.scaled_dot_product_attention
    if enabled:
        def free(query, key, value, *args, **kwargs):  # diffusers passes keywords
            return _free_attention(query, key, value)
        F.scaled_dot_product_attention = free
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def uncompile_blocks(model):
    """Undo compile_repeated_blocks (it sets each block's compiled call in place)."""
    for module in model.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None


def forward(m, spec, x, t, text):
    return m(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False, **spec["extra"])[0]


def denoise(m, spec, x, text, steps):
    """Euler on the velocity over `steps` decreasing timesteps (the step clock sees a generation)."""
    ts = torch.linspace(999, 0, steps + 1, device=x.device)
    for i in range(steps):
        v = forward(m, spec, x, ts[i:i + 1].round().long(), text)
        x = x + (ts[i + 1] - ts[i]) / 1000 * v
    return x


def time_ms(fn, warmup_ms, rep_ms):
    """Median forward ms: triton's do_bench, or for forwards over a second (the 14B model, dense)
    the median of 3 CUDA-event-timed calls after one warm call (do_bench would take 8+ calls)."""
    if event_ms(fn, 1) < 1000:
        return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    return event_ms(fn, 3)


def event_ms(fn, calls, before=lambda: None):
    """Median ms of `calls` calls of fn, each timed alone with CUDA events (the wall clock where there
    is no GPU), `before()` run untimed ahead of each."""
    times = []
    for _ in range(calls):
        before()
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000)
    return sorted(times)[len(times) // 2]


def profile(m, spec, x, t, text):
    """One forward under the profiler: CUDA kernel time by kernel, and grouped; the wall time beside
    the kernels' sum (the GPU's idle time where they run one after another, plus the profiler's own
    overhead), and the host calls that could leave it idle: synchronizing CUDA runtime calls (one
    cudaDeviceSynchronize is this function's own, at the end of the forward) and the host ops with the
    most own time."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    forward(m, spec, x, t, text)
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        forward(m, spec, x, t, text)
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) * 1000
    kernels, host = [], []
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if us > 0 and e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False):
            kernels.append(dict(name=e.key[:120], ms=us / 1000, calls=e.count))
        elif e.device_type == torch.autograd.DeviceType.CPU:
            host.append(dict(name=e.key[:120], self_ms=e.self_cpu_time_total / 1000, calls=e.count))
    kernels.sort(key=lambda k: -k["ms"])
    host.sort(key=lambda h: -h["self_ms"])
    groups = dict(attention=0.0, gemm=0.0, other=0.0)
    for k in kernels:
        groups[kernel_group(k["name"])] += k["ms"]
    syncing = [h for h in host if re.search(r"Synchronize|Memcpy|local_scalar_dense|item|cudaMalloc|cudaFree", h["name"])]
    return dict(groups_ms=groups, top=kernels[:25], wall_ms=wall_ms, kernels_ms=sum(k["ms"] for k in kernels),
                host_syncing=syncing, host_top=host[:15])


def run(args):
    spec = MODELS[args.model]
    if args.layers:   # N blocks of each kind (HunyuanVideo: N dual- and N single-stream)
        kinds = [k for k in ("num_layers", "num_single_layers") if k in spec["config"]]
        spec = dict(spec, config={**spec["config"], **{k: args.layers for k in kinds}})
    model, x, text = build(spec)
    spec["extra"] = extra_inputs(spec)
    t = torch.tensor([500], device="cuda")
    name = f"e2e-{args.model}-{args.layers}layers.json" if args.layers else f"e2e-{args.model}.json"
    out_path = os.path.join(os.environ.get("OUT", "."), name)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                model=args.model, config=spec["config"], latent=spec["latent"], text=spec["text"],
                window=spec["window"], steps=args.steps, dense_steps=args.dense_steps,
                inductor_caches_disabled=os.environ.get("TORCHINDUCTOR_FORCE_DISABLE_CACHES") == "1",
                # TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1 tunes every variant's Inductor kernels alike
                coordinate_descent_tuning=torch._inductor.config.coordinate_descent_tuning)
    print(json.dumps(meta), flush=True)
    res, outs = {}, {}
    for name in args.variants:
        torch._dynamo.reset()
        compact_compile.report(clear=True)
        with torch.no_grad(), free_attention("no-attention" in name):
            m = compiled(model, name, spec, args.dense_steps)
            with at_step(args.dense_steps):  # a constant timestep is step 0: pin a sparse step
                t0 = time.time()
                outs[name] = forward(m, spec, x, t, text)
                torch.cuda.synchronize()
                r = dict(first_call_s=time.time() - t0)
                r["ms"] = time_ms(lambda: forward(m, spec, x, t, text), args.warmup_ms, args.rep_ms)
                if name in args.profile:
                    r["profile"] = profile(m, spec, x, t, text)
            if args.steps:
                denoise(m, spec, x, text, args.steps)
                torch.cuda.synchronize()
                t0 = time.time()
                denoise(m, spec, x, text, args.steps)
                torch.cuda.synchronize()
                r["loop_s"] = time.time() - t0
        r.update(describe(name, outs))
        res[name] = r
        print(name, json.dumps({k: v for k, v in r.items() if k != "profile"}), flush=True)
        save(out_path, meta, res)
        uncompile_blocks(model)
        del m
        torch.cuda.empty_cache()


def describe(name, outs):
    """Sites, density, kernel, quantized linears, and output differences."""
    r = {}
    if name.startswith("compact"):
        rep = compact_compile.report()
        rewritten = [s for s in rep.sites if s["rewritten"]]
        r.update(sites=len(rep.sites), rewritten=len(rewritten),
                 kernels=sorted({s["kernel"] for s in rewritten}), key_masked=sum(s["key_mask"] for s in rewritten),
                 kernel_reason=rewritten[0]["kernel_reason"] if rewritten else None,
                 density=sum(s["density"] for s in rewritten) / len(rewritten) if rewritten else None,  # None: all dense
                 quantized=rep.quantized)
    base = outs.get("inductor-dense", outs.get("inductor-dense-regional"))
    if base is not None and outs[name] is not base:
        r["rel_diff_vs_inductor_dense"] = rel_diff(outs[name], base)
    unquantized = re.sub(r"-(fp8|int8)", "", name).replace("compact-dense", "inductor-dense")
    if unquantized != name and unquantized in outs:
        r["rel_diff_vs_unquantized"] = rel_diff(outs[name], outs[unquantized])
    return r


def save(path, meta, res):
    for base in ("inductor-dense", "inductor-dense-regional"):
        if base in res:
            for name in res:
                res[name][f"speedup_vs_{base}"] = res[base]["ms"] / res[name]["ms"]
    with open(path, "w") as f:
        json.dump(dict(meta, results=res), f, indent=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", choices=MODELS)
    ap.add_argument("variants", nargs="*", default=["inductor-dense", "compact-window"])
    ap.add_argument("--steps", type=int, default=0, help="denoising-loop steps (0: no loop)")
    ap.add_argument("--dense-steps", type=int, default=0, help="compact variants: first N steps dense")
    ap.add_argument("--profile", nargs="*", default=[], help="variants to profile")
    ap.add_argument("--warmup-ms", type=int, default=500)
    ap.add_argument("--rep-ms", type=int, default=3000)
    ap.add_argument("--layers", type=int, default=0, help="blocks in the model (0: its own); quick profiles")
    args = ap.parse_args()
    unknown = [v for v in args.variants + args.profile if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    run(args)


if __name__ == "__main__":
    main()
