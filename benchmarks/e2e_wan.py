"""One forward of a diffusers WanTransformer3DModel at the Wan2.1-1.3B config, 480p 81 frames
(grid 21×30×52 = 32760 tokens), bf16, random weights (weights do not change speed), on the GPU:
eager, inductor dense, backend="compact" with several plans and kernels. Same process, same inputs.
Writes $OUT/e2e_wan.json. Usage: python benchmarks/e2e_wan.py [variant ...]"""
import json
import os
import sys
import time

import torch
import triton
from diffusers import WanTransformer3DModel

import compact_compile

CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
              text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
              qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
VARIANTS = {
    "eager": None,
    "inductor-dense": dict(backend="inductor"),
    "compact-dense": dict(backend="compact", options=dict(plan="dense")),
    "compact-window-flex": dict(backend="compact", options=dict(plan="window", window=(3, 3, 3), kernel="flex")),
    "compact-window": dict(backend="compact", options=dict(plan="window", window=(3, 3, 3))),
    "compact-window-rectify": dict(backend="compact", options=dict(plan="window", window=(3, 3, 3), rectify=True)),
    "compact-dynamic-rectify": dict(backend="compact", options=dict(plan="dynamic", drop=0.9, rectify=True)),
}


def main(names):
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name(), flush=True)
    model = WanTransformer3DModel(**CONFIG).to(dev, dt).eval()
    x = torch.randn(1, 16, 21, 60, 104, device=dev, dtype=dt)
    t = torch.tensor([500], device=dev)
    ctx = torch.randn(1, 512, 4096, device=dev, dtype=dt)
    res, outs = {}, {}
    for name in names:
        torch._dynamo.reset()
        kw = VARIANTS[name]
        m = model if kw is None else torch.compile(model, dynamic=False, **kw)
        with torch.no_grad():
            t0 = time.time()
            outs[name] = m(x, t, ctx, return_dict=False)[0]
            torch.cuda.synchronize()
            first = time.time() - t0
            ms = triton.testing.do_bench(lambda: m(x, t, ctx, return_dict=False), warmup=500, rep=3000,
                                         return_mode="median")
        res[name] = dict(ms=ms, first_call_s=first)
        if name.startswith("compact"):
            sites = compact_compile.report(clear=True).sites
            rewritten = [s for s in sites if s["rewritten"]]
            res[name].update(sites=len(sites), rewritten=len(rewritten), kernel=rewritten[0]["kernel"],
                             density=sum(s["density"] for s in rewritten) / max(1, len(rewritten)))
        base = outs.get("inductor-dense", outs.get("eager"))
        if base is not None and name != "inductor-dense":
            res[name]["rel_diff_vs_dense"] = ((outs[name].float() - base.float()).norm() / base.float().norm()).item()
        print(name, json.dumps(res[name]), flush=True)
        save(res)  # after every variant: a run stopped at its time limit keeps what it measured


def save(res):
    if "inductor-dense" in res:
        for name in res:
            res[name]["speedup_vs_inductor_dense"] = res["inductor-dense"]["ms"] / res[name]["ms"]
    json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                   config=CONFIG, latent=[1, 16, 21, 60, 104], results=res),
              open(os.path.join(os.environ.get("OUT", "."), "e2e_wan.json"), "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1:] or list(VARIANTS))
