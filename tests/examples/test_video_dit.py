"""examples/video_dit: procedural clips, captions, a training step, the sampler, and the committed
checkpoint through the compact backend (CPU, tiny sizes)."""
import dataclasses

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import compact_compile
from examples.video_dit.clips import DIGIT_SIDE, NUM_CLASSES, make_clips, render, sample_scene
from examples.video_dit.model import CAPTION_DIM, CAPTION_LEN, NULL, TINY, build_model, caption, from_name, load_model
from examples.video_dit.sample import fixed_noise, sample, save_gif, save_strip, timesteps
from examples.video_dit.train import flow_loss, train_step

SHORT = from_name("short")


def relative(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


# ----------------------------------------------------------------------------------------------
# clips


@settings(max_examples=8, deadline=None)
@given(batch=st.integers(1, 3), frames=st.integers(1, 6), size=st.sampled_from([8, 16, 24, 32]),
       seed=st.integers(0, 2**31))
def test_clips_shape_range_labels_and_determinism(batch, frames, size, seed):
    video, labels = make_clips(batch, frames=frames, size=size, generator=torch.Generator().manual_seed(seed))
    assert video.shape == (batch, 3, frames, size, size) and video.dtype == torch.float32
    assert video.min() >= -1 and video.max() <= 1 and torch.isfinite(video).all()
    assert labels.dtype == torch.long and labels.shape == (batch,)
    assert ((labels >= 0) & (labels < NUM_CLASSES)).all()
    again, labels_again = make_clips(batch, frames=frames, size=size, generator=seed)   # an int seed: same draw
    assert torch.equal(video, again) and torch.equal(labels, labels_again)


def test_clips_differ_between_seeds_and_labels_cover_the_classes():
    a, labels = make_clips(64, frames=2, size=16, generator=0)
    b, _ = make_clips(64, frames=2, size=16, generator=1)
    assert (a - b).abs().mean() > 0.1
    assert set(labels.tolist()) == set(range(NUM_CLASSES))


def test_the_digit_moves_and_only_it_changes_on_a_still_background():
    scene = sample_scene(4, torch.Generator().manual_seed(3))
    still = dataclasses.replace(scene, pan_vel=torch.zeros_like(scene.pan_vel),
                                shape_present=torch.zeros_like(scene.shape_present))
    frames, size = 6, 32
    video = render(still, frames, size)
    diff = (video[:, :, 1:] - video[:, :, :-1]).abs().amax(1)          # [B, T-1, H, W]
    assert (diff.flatten(1).amax(1) > 0.2).all()                         # every clip's digit moves
    # …and changes happen only inside the boxes the digit covers in the two frames compared
    corner = _digit_corners(scene, frames, size)                             # [B, T, 2] in pixels
    side = DIGIT_SIDE * size
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    inside = ((xs >= corner[..., 0, None, None] - 1) & (xs <= corner[..., 0, None, None] + side + 1)
              & (ys >= corner[..., 1, None, None] - 1) & (ys <= corner[..., 1, None, None] + side + 1))
    assert diff[~(inside[:, 1:] | inside[:, :-1])].abs().max() < 1e-5
    # with the shapes and the pan back, the background moves too
    full = render(scene, frames, size)
    assert ((full[:, :, 1:] - full[:, :, :-1]).abs().amax(1)[~(inside[:, 1:] | inside[:, :-1])] > 1e-3).any()


def _digit_corners(scene, frames, size):
    """The digit's top-left corner per frame in pixels (a bounce in [0, 1 - DIGIT_SIDE], written out)."""
    p = scene.digit_pos[:, None] + torch.arange(frames)[:, None] * scene.digit_vel[:, None]
    span = 1 - DIGIT_SIDE
    u = torch.remainder(p, 2 * span)
    return torch.where(u > span, 2 * span - u, u) * size


# ----------------------------------------------------------------------------------------------
# captions and model


def test_caption_shapes_fixed_per_class_and_null_is_zero():
    labels = torch.tensor([0, 3, 3, NULL])
    ctx = caption(labels)
    assert ctx.shape == (4, CAPTION_LEN, CAPTION_DIM) and ctx.dtype == torch.float32
    assert torch.equal(ctx[1], ctx[2]) and not torch.equal(ctx[0], ctx[1])
    assert torch.equal(ctx[3], torch.zeros_like(ctx[3]))
    assert torch.equal(caption(torch.arange(NUM_CLASSES)), caption(torch.arange(NUM_CLASSES)))


def test_build_model_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(7)
    before = torch.rand(1)
    torch.manual_seed(7)
    a, b = build_model("short", 5, **TINY), build_model(SHORT, 5, **TINY)
    assert torch.rand(1) == before
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_checkpoint_loads_and_fits_16_mib():
    assert SHORT.checkpoint.is_file() and SHORT.checkpoint.stat().st_size <= 16 * 2**20
    model = load_model()
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert {k: model.config[k] for k in SHORT.transformer} == SHORT.transformer
    half = load_model(dtype=torch.bfloat16)     # Wan's fp32 modules stay fp32, as with from_pretrained
    assert half.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert half.blocks[0].scale_shift_table.dtype == half.rope.freqs_cos.dtype == torch.float32
    assert half.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32


# ----------------------------------------------------------------------------------------------
# training


def test_train_step_finite_and_loss_goes_down_on_a_fixed_batch():
    model = build_model("short", 0, **TINY).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    clips, labels = make_clips(4, frames=2, size=16, generator=0)
    g = torch.Generator().manual_seed(0)
    t = torch.linspace(0.2, 0.8, 4)
    noise = torch.randn(clips.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = flow_loss(model, clips, labels, t, noise).item()
    losses = [train_step(model, opt, clips, labels, g).item() for _ in range(25)]
    with torch.no_grad():
        after = flow_loss(model, clips, labels, t, noise).item()
    assert all(torch.isfinite(torch.tensor(losses)))
    assert after < 0.7 * before, (before, after)


# ----------------------------------------------------------------------------------------------
# sampling


def test_sample_is_deterministic_and_cfg_1_is_plain_euler():
    model = build_model("short", 0, **TINY).eval()
    noise = fixed_noise(2, frames=2, size=16, seed=3)
    labels = torch.tensor([1, 7])
    out = sample(model, noise, labels, steps=3, cfg=1.0)
    assert torch.equal(out, sample(model, fixed_noise(2, 2, 16, seed=3), labels, steps=3, cfg=1.0))
    x, ts = noise.clone(), [1.0, 2 / 3, 1 / 3, 0.0]
    with torch.no_grad():
        for t, t_next in zip(ts, ts[1:]):
            v = model(hidden_states=x, timestep=torch.full((2,), t * 1000), encoder_hidden_states=caption(labels),
                      return_dict=False)[0]
            x = x + (t_next - t) * v
    assert relative(out, x.clamp(-1, 1)) < 1e-6
    guided = sample(model, noise, labels, steps=3, cfg=3.0)
    assert guided.shape == out.shape and relative(guided, out) > 1e-3 and guided.abs().max() <= 1


def test_timestep_shift():
    assert torch.allclose(timesteps(4), torch.tensor([1, 0.75, 0.5, 0.25, 0], dtype=torch.float64))
    shifted = timesteps(4, shift=3.0)
    assert shifted[0] == 1 and shifted[-1] == 0 and (shifted[1:-1] > timesteps(4)[1:-1]).all()


def test_strip_and_gif_are_written(tmp_path):
    from PIL import Image

    videos = {"data": make_clips(1, frames=4, size=16, generator=0)[0][0], "noise": fixed_noise(1, 4, 16)[0]}
    save_strip(videos, tmp_path / "strip.png", frames=3)
    save_gif(videos, tmp_path / "clip.gif")
    assert Image.open(tmp_path / "strip.png").size[0] > 0
    gif = Image.open(tmp_path / "clip.gif")
    assert gif.n_frames == 4 and gif.size[0] >= 2 * 16 * 2


def test_checkpoint_through_compact_backend_matches_uncompiled():
    model = load_model()
    noise = fixed_noise(1, frames=4, size=32, seed=0)      # patch 1×4×4: a 4×8×8 grid of 256 tokens
    labels = torch.tensor([5])
    ref = sample(model, noise, labels, steps=2, cfg=3.0)
    fast = torch.compile(model, backend="compact", options={"plan": "dense", "inner": "inductor"})
    out = sample(fast, noise, labels, steps=2, cfg=3.0)
    assert relative(out, ref) <= 1e-4
    sites = compact_compile.report().sites
    rewritten = [s for s in sites if s["rewritten"]]
    assert len(rewritten) == SHORT.transformer["num_layers"]                      # every self-attention, once
    assert all(tuple(s["grid"]) == (4, 8, 8) and s["density"] == 1.0 for s in rewritten)
