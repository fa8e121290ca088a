"""Every video transformer diffusers exports (tests/family.py), through `backend="compact"` with no
option beyond the plan: the dense plan equals the uncompiled model, the window plan rewrites the
video attention of every model in SUPPORT marked "sparse", and every other model says why not.

The README's table of supported models is this file's SUPPORT, printed by
`python tests/test_family.py`; a test keeps the two the same.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from family import FAMILY

import compact_compile

# model → ("sparse", what is rewritten) or ("dense", why not: a pattern the report's reasons match)
SUPPORT = {
    "wan": ("sparse", "video self-attention"),
    "wan_i2v": ("sparse", "video self-attention"),
    "wan_vace": ("sparse", "video self-attention, VACE blocks too"),
    "chronoedit": ("sparse", "video self-attention"),
    "skyreels_v2": ("sparse", "video self-attention"),
    "skyreels_v2_df": ("sparse", "video self-attention with its frame-causal mask (diffusion forcing), on "
                                 "FlexAttention"),
    "wan_animate": ("sparse", "video self-attention"),
    "helios": ("sparse", "joint attention, history tokens before the video kept dense"),
    "anyflow": ("sparse", "video self-attention"),
    "cogvideox": ("sparse", "joint attention, text first"),
    "cogvideox15": ("sparse", "joint attention, text first (grid from the Linear patchify's reshapes)"),
    "consisid": ("sparse", "joint attention, text first"),
    "hunyuan_video": ("sparse", "joint attention with the prompt's key-padding mask, text last"),
    "hunyuan_video15": ("sparse", "joint attention with valid_q ⊗ valid_k prompt masks, text last (grid carried "
                                  "across its graph breaks)"),
    "hunyuan_video_framepack": ("sparse", "joint attention: history frames before the video, text after (grid and "
                                          "history carried across its graph break)"),
    "motif_video": ("sparse", "joint attention with the prompt's key-padding mask, text last"),
    "ltx_video": ("sparse", "video self-attention (grid from the RoPE coordinates)"),
    "mochi": ("sparse", "joint attention with the prompt's key-padding mask (prompt gather replaced while tracing)"),
    "allegro": ("sparse", "video self-attention"),
    "latte": ("sparse", "spatial attention per frame; temporal attention (frames folded into the batch) stays dense"),
    "easyanimate": ("sparse", "joint attention, text first"),
    "cosmos": ("sparse", "video self-attention (grid from the Linear patchify's reshapes)"),
    "sana_video": ("dense", "no softmax self-attention: ReLU linear attention"),
    "kandinsky5": ("sparse", "video self-attention (grid from the Linear patchify's reshapes)"),
    "kandinsky6": ("sparse", "video self-attention; audio attention stays dense"),
    "kandinsky6_sr": ("sparse", "video self-attention: flex_attention, its NABLA mask kept inside the plan's blocks"),
    "ltx2": ("sparse", "video self-attention; audio attention stays dense"),
    "sana_wm": ("sparse", "the softmax blocks' self-attention; Gated-DeltaNet blocks are not softmax attention"),
    "sana_wm_refiner": ("dense", "no video grid"),
    "joyimage_edit": ("sparse", "joint attention over two images and text"),
    "joyimage_edit_plus": ("dense", "do not match the video grid"),
    "minimax_h3": ("dense", "no video grid"),
    "cosmos3_omni": ("dense", "video queries over text and video keys: cross-attention shaped, with GQA"),
    "anyflow_far": ("dense", "flex_attention over cached chunks.*queries and keys are different token sets"),
    "wan_animate2": ("dense", "graph breaks; flex_attention over cached reference keys.*queries and keys are different "
                     "token sets"),
    "kandinsky5_nabla": ("sparse", "video self-attention: flex_attention, its NABLA mask kept inside the plan's blocks"),
}
# what only a description can say (the report's reasons cannot): the graph shows no SDPA self-attention
NO_SELF_ATTENTION_SITE = {"sana_video", "cosmos3_omni"}
SMALL_DIFF = {"kandinsky5": 5e-5, "sana_wm": 5e-4}   # the model's own bf16 RoPE / fp32 SDPA noise (family.py)


def first_tensor(out):
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out


def compile_and_run(name, plan):
    torch._dynamo.reset()
    compact_compile.report(clear=True)
    model, inputs = FAMILY[name]()
    with torch.no_grad():
        ref = first_tensor(model(**inputs))
        out = first_tensor(torch.compile(model, backend="compact", options={"plan": plan, "inner": "eager",
                                                                            "block_size": 64})(**inputs))
    return out, ref, compact_compile.report().sites


@pytest.mark.parametrize("name", list(FAMILY))
def test_every_diffusers_video_transformer(name):
    """Dense plan: the output of the uncompiled model (rewritten sites included), whatever the model.
    Window plan: the SUPPORT entry holds — sparse models get their video attention rewritten, the
    others name why in the report."""
    status, what = SUPPORT[name]
    out, ref, sites = compile_and_run(name, "dense")
    rel = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    assert rel <= SMALL_DIFF.get(name, 1e-6), f"dense plan moved {name}'s output by {rel:.3g}"
    out, ref, sites = compile_and_run(name, "window")
    assert torch.isfinite(out).all()
    rewritten = [s for s in sites if s["rewritten"]]
    if status == "sparse":
        assert rewritten, f"{name}: nothing rewritten: {[(s['site'], s['reason']) for s in sites]}"
        assert all(s["kind"] in ("video self-attention", "joint text+video") for s in rewritten)
    else:
        assert not rewritten
        reasons = " | ".join(s["reason"] or "" for s in sites)
        if name not in NO_SELF_ATTENTION_SITE:
            pattern = what.split(".*")[-1]
            assert re.search(pattern, reasons), f"{name}: {pattern!r} not among the reasons: {reasons}"


def support_table() -> str:
    rows = ["| model (tests/family.py) | block-sparse | what runs block-sparse, or why not |", "|---|---|---|"]
    for name, (status, what) in SUPPORT.items():
        rows.append(f"| {name} | {'yes' if status == 'sparse' else 'no'} | {what.replace('.*', ': ')} |")
    return "\n".join(rows)


def test_readme_lists_every_model_as_this_file_does():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert support_table() in readme, "README's model table is stale: paste `python tests/test_family.py`"
    assert set(SUPPORT) == set(FAMILY)


if __name__ == "__main__":
    sys.exit(print(support_table()))
