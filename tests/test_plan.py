"""Plan files: round trip, validation on load, and what happens when a plan does not fit a model."""
import hashlib
import json
import math
import os
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from support import AS_PLANNED, SelfAttention, Wrapper, masked_sdpa, model_order_mask, raises_from_backend, rel_err

import compact_compile
from compact_compile.layout import TokenLayout
from compact_compile.options import CompactOptions
from compact_compile.passes.sites import VIDEO, Site
from compact_compile.plan import FORMAT, FORMAT_VERSION, Plan, PlanError, SitePlan
from compact_compile.planner import site_blocks, site_layout


def random_blocks(gen: torch.Generator, heads: int, nb: int, p: float) -> torch.Tensor:
    blocks = torch.rand(heads, nb, nb, generator=gen) < p
    return blocks | torch.eye(nb, dtype=torch.bool)  # every query block sees at least itself


@st.composite
def plans(draw):
    grid = draw(st.tuples(st.integers(1, 4), st.integers(1, 9), st.integers(1, 9)))
    tile = draw(st.tuples(st.sampled_from([1, 2]), st.sampled_from([1, 2, 4]), st.sampled_from([1, 2, 4])))
    plan = Plan(grid, tile, math.prod(tile), info=dict(seed=draw(st.integers(0, 99)), note="test"))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    for i in range(draw(st.integers(0, 4))):
        heads = draw(st.integers(1, 4))
        n_text = draw(st.integers(0, 12))
        n_before = draw(st.integers(0, n_text))
        layout = TokenLayout(grid, tile, plan.block_size, n_text, n_before)
        mask_heads = draw(st.sampled_from([1, heads]))
        blocks = random_blocks(gen, mask_heads, layout.n_blocks, draw(st.floats(0, 1)))
        plan.sites[f"blocks.{i}.attn1"] = SitePlan(heads, draw(st.sampled_from([16, 64, 128])), layout.seq_len,
                                                   n_text, n_before, blocks)
    return plan


@settings(max_examples=60, deadline=None)
@given(plans())
def test_save_load_round_trip(plan):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "p.plan.safetensors"
        plan.save(path)
        back = compact_compile.load_plan(path)
    assert (back.grid, back.tile, back.block_size, back.info) == (plan.grid, plan.tile, plan.block_size, plan.info)
    assert list(back.sites) == list(plan.sites)
    for name, s in plan.sites.items():
        b = back.sites[name]
        assert (b.heads, b.head_dim, b.seq_len, b.n_text, b.n_before) == (s.heads, s.head_dim, s.seq_len,
                                                                        s.n_text, s.n_before)
        assert b.blocks.dtype == torch.bool and torch.equal(b.blocks, s.blocks)
        assert b.density == pytest.approx(s.density)
        assert back.layout(name) == TokenLayout(plan.grid, plan.tile, plan.block_size, s.n_text, s.n_before)


# ----------------------------------------------------------------------------------------------
# files that are not valid plans


def small_plan(heads: int = 2, name: str = "attn", grid=(2, 8, 8), tile=(1, 8, 8), n_text=0, seed=0) -> Plan:
    plan = Plan(grid, tile, math.prod(tile))
    layout = TokenLayout(grid, tile, plan.block_size, n_text, 0)
    gen = torch.Generator().manual_seed(seed)
    plan.sites[name] = SitePlan(heads, 16, layout.seq_len, n_text, 0,
                                random_blocks(gen, heads, layout.n_blocks, 0.5))
    return plan


@pytest.fixture
def plan_file(tmp_path):
    path = tmp_path / "ok.plan.safetensors"
    small_plan(grid=(2, 8, 8), tile=(1, 4, 4), n_text=5).save(path)
    return path


def rewrite_metadata(src: Path, dst: Path, edit, tensors_edit=None):
    """Copy a plan file, passing its JSON metadata (a dict) through `edit` and tensors through `tensors_edit`."""
    tensors = load_file(str(src))
    with open(src, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    meta = json.loads(header["__metadata__"]["compact_compile"])
    meta = edit(meta)
    if tensors_edit:
        tensors = tensors_edit(tensors)
    raw = meta if isinstance(meta, str) else json.dumps(meta)
    save_file(tensors, str(dst), metadata={"compact_compile": raw})
    return dst


def test_missing_file():
    with pytest.raises(PlanError, match="does not exist"):
        Plan.load("/nonexistent/dir/x.plan.safetensors")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(min_size=0, max_size=300))
def test_random_bytes_are_rejected(tmp_path, data):
    path = tmp_path / "random.plan.safetensors"
    path.write_bytes(data)
    with pytest.raises(PlanError, match="not a readable compact_compile plan"):
        Plan.load(path)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_truncated_file_is_rejected(tmp_path, plan_file, data):
    raw = plan_file.read_bytes()
    cut = data.draw(st.integers(0, len(raw) - 1))
    path = tmp_path / "truncated.plan.safetensors"
    path.write_bytes(raw[:cut])
    with pytest.raises(PlanError):
        Plan.load(path)


def test_safetensors_without_plan_metadata(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(3)}, str(path), metadata={"other": "x"})
    with pytest.raises(PlanError, match="not a readable compact_compile plan"):
        Plan.load(path)


@pytest.mark.parametrize("edit, match", [
    (lambda m: {**m, "format": "someone.else"}, "not a compact_compile plan"),
    (lambda m: {k: v for k, v in m.items() if k != "format"}, "not a compact_compile plan"),
    (lambda m: {**m, "version": FORMAT_VERSION + 1}, f"version {FORMAT_VERSION + 1}"),
    (lambda m: {**m, "version": str(FORMAT_VERSION)}, "version"),
    (lambda m: {k: v for k, v in m.items() if k != "grid"}, "incomplete or malformed"),
    (lambda m: {**m, "sites": {n: {k: v for k, v in s.items() if k != "heads"} for n, s in m["sites"].items()}},
     "incomplete or malformed"),
    (lambda m: {**m, "sites": {n: {**s, "tensor": "nope"} for n, s in m["sites"].items()}}, "incomplete or malformed"),
    (lambda m: {**m, "sites": {n: {**s, "mask_heads": 3} for n, s in m["sites"].items()}}, "attn"),
    (lambda m: {**m, "sites": {n: {**s, "seq_len": s["seq_len"] + 1} for n, s in m["sites"].items()}}, "inconsistent"),
    (lambda m: {**m, "sites": {n: {**s, "n_text": 0} for n, s in m["sites"].items()}}, "attn"),
    (lambda m: {**m, "tile": [1, 8, 8]}, "malformed"),   # 64 tokens per tile, 16 per block
    # malformed JSON values: each must be a PlanError, never another exception
    (lambda m: json.dumps([m]), "malformed"),
    (lambda m: "null", "malformed"),
    (lambda m: {**m, "sites": list(m["sites"].values())}, "malformed"),
    (lambda m: {**m, "grid": [2, 8]}, "malformed"),
    (lambda m: {**m, "grid": "abc"}, "malformed"),
    (lambda m: {**m, "tile": [1, 0, 4]}, "malformed"),
    (lambda m: {**m, "block_size": 0}, "malformed"),
    (lambda m: {**m, "block_size": -16}, "malformed"),
], ids=["format", "no-format", "version", "version-str", "no-grid", "no-heads", "no-tensor", "mask-heads",
        "seq-len", "n-text", "tile", "meta-list", "meta-null", "sites-list", "grid-len", "grid-str", "tile-zero",
        "block-zero", "block-negative"])
def test_bad_metadata_is_rejected(tmp_path, plan_file, edit, match):
    path = rewrite_metadata(plan_file, tmp_path / "bad.plan.safetensors", edit)
    with pytest.raises(PlanError, match=match):
        Plan.load(path)


@pytest.mark.parametrize("make", [
    lambda t: t[:, :-1],                       # one query block short
    lambda t: t[:, :, :-1],                    # one byte of key bits short
    lambda t: torch.cat([t, t]),               # twice the heads
    lambda t: t.to(torch.int32),               # not bit-packed bytes
    lambda t: t[0],                            # heads axis lost
], ids=["rows", "cols", "heads", "dtype", "ndim"])
def test_shape_mismatched_tensor_is_rejected(tmp_path, plan_file, make):
    path = rewrite_metadata(plan_file, tmp_path / "bad.plan.safetensors", lambda m: m,
                            lambda ts: {k: make(v).contiguous() for k, v in ts.items()})
    with pytest.raises(PlanError, match="'attn' block map has shape"):
        Plan.load(path)


def data_region(path: Path) -> tuple[int, int]:
    """Byte range of a safetensors file's tensor data (after the 8-byte length and the JSON header)."""
    raw = path.read_bytes()
    return 8 + int.from_bytes(raw[:8], "little"), len(raw)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_a_flipped_bit_in_the_block_data_is_corruption(tmp_path, plan_file, data):
    start, end = data_region(plan_file)
    raw = bytearray(plan_file.read_bytes())
    raw[data.draw(st.integers(start, end - 1))] ^= 1 << data.draw(st.integers(0, 7))
    path = tmp_path / "flipped.plan.safetensors"
    path.write_bytes(bytes(raw))
    with pytest.raises(PlanError, match=r"flipped.plan.safetensors' is corrupt: the block map of site 'attn' "
                                        r"\(tensor 'site0'\) does not match the SHA-256"):
        Plan.load(path)


def test_files_without_a_checksum_still_load(tmp_path, plan_file):
    """Plans saved before the checksum existed: loaded as before, unchecked."""
    def drop_checksums(meta):
        return {**meta, "sites": {n: {k: v for k, v in s.items() if k != "sha256"} for n, s in meta["sites"].items()}}

    old = rewrite_metadata(plan_file, tmp_path / "old.plan.safetensors", drop_checksums)
    back, ref = Plan.load(old), Plan.load(plan_file)
    assert torch.equal(back.sites["attn"].blocks, ref.sites["attn"].blocks)


def test_saved_checksum_is_of_the_packed_bytes(plan_file):
    with open(plan_file, "rb") as f:
        meta = json.loads(json.loads(f.read(int.from_bytes(f.read(8), "little")))["__metadata__"]["compact_compile"])
    packed = load_file(str(plan_file))["site0"]
    assert meta["sites"]["attn"]["sha256"] == hashlib.sha256(packed.numpy().tobytes()).hexdigest()
    assert meta["version"] == FORMAT_VERSION == 2


@pytest.mark.parametrize("text_first", [True, False])
def test_version_1_plans_with_text_first_still_load(tmp_path, text_first):
    """Version 1 said where a joint site's text was with `text_first` (all before or all after)."""
    plan = small_plan(n_text=5)
    plan.save(tmp_path / "p.plan.safetensors")

    def as_version_1(meta):
        sites = {n: {**{k: v for k, v in s.items() if k != "n_before"}, "text_first": text_first}
                 for n, s in meta["sites"].items()}
        return {**meta, "version": 1, "sites": sites}

    old = Plan.load(rewrite_metadata(tmp_path / "p.plan.safetensors", tmp_path / "v1.plan.safetensors", as_version_1))
    assert old.sites["attn"].n_before == (5 if text_first else 0)
    assert torch.equal(old.sites["attn"].blocks, plan.sites["attn"].blocks)


def test_query_block_with_no_key_block_is_rejected(tmp_path):
    plan = small_plan()
    plan.sites["attn"].blocks[1, 0] = False
    plan.save(tmp_path / "p.safetensors")
    with pytest.raises(PlanError, match="attends to nothing"):
        Plan.load(tmp_path / "p.safetensors")


def _broken(how):
    plan = small_plan()
    blocks = plan.sites["attn"].blocks
    if how == "empty row":
        blocks[1, 0] = False
    elif how == "shape":
        plan.sites["attn"].blocks = blocks[:, :1]
    elif how == "float":
        plan.sites["attn"].blocks = blocks.float()
    elif how == "info":
        plan.info = ["x"]
    elif how == "layout":
        plan.sites["attn"].n_before = 5            # more tokens before the video than it has other tokens
    return plan


@pytest.mark.parametrize("how, match", [("empty row", "attends to nothing"), ("shape", r"expected bool \(1 or 2, 2, 2\)"),
                                        ("float", "block map is torch.float32"), ("info", "info must be a dict"),
                                        ("layout", "site 'attn': n_before must be an int in")])
def test_a_plan_given_as_an_object_is_checked_as_a_file_is(how, match):
    """A plan made in memory (calibrate's .plan, edited) goes through the same checks as a file: one
    PlanError, not a row of zeros (an empty row), a lowering error (a wrong shape) or a TypeError."""
    model = Wrapper(SelfAttention(dim=32, heads=2)).eval()
    with raises_from_backend(PlanError, match), torch.no_grad():
        torch.compile(model, backend="compact", options=dict(plan=_broken(how), inner="eager"))(torch.randn(1, 128, 32))


@pytest.mark.parametrize("schedule, match", [
    ({"dense_steps": 3}, "its schedule .* is malformed"),
    ({"dense_steps": 3, "ranges": [[5, None]]}, "must follow each other from step 3"),
    ({"dense_steps": 3, "ranges": [[3, 6], [6, None]]}, "no entry 'attn@6' for site 'attn'"),
])
def test_a_plan_files_schedule_is_checked_when_it_is_read(tmp_path, schedule, match):
    """It was read only when a site used it: a KeyError inside the compile, or (a gap) steps 3-4 silently
    dense."""
    plan = small_plan()
    plan.info["schedule"] = schedule
    plan.save(tmp_path / "p.safetensors")
    with pytest.raises(PlanError, match=match):
        Plan.load(tmp_path / "p.safetensors")


def test_a_later_step_ranges_entry_must_fit_the_site_too(tmp_path):
    """Only the first range's entry was fitted to the model: `attn@6` made for 4 heads and another head
    dim loaded, and the site crashed the process (SIGFPE) or, all ones, ran dense without a word."""
    plan = small_plan()
    plan.info["schedule"] = {"dense_steps": 3, "ranges": [[3, 6], [6, None]]}
    plan.sites["attn@6"] = SitePlan(4, 32, 128, 0, 0, torch.ones(4, 2, 2, dtype=torch.bool))
    plan.save(tmp_path / "p.safetensors")
    model = Wrapper(SelfAttention(dim=32, heads=2)).eval()
    with raises_from_backend(PlanError, r"plan does not fit site 'attn' \(its step-range entry 'attn@6'\): heads 4"), \
            torch.no_grad():
        torch.compile(model, backend="compact", options=dict(plan=str(tmp_path / "p.safetensors"), inner="eager"))(
            torch.randn(1, 128, 32))


# ----------------------------------------------------------------------------------------------
# a valid plan made for another model


def site(name="attn", heads=2, head_dim=16, S=128, n_text=0, n_before=0) -> Site:
    return Site(node=None, name=name, kind=VIDEO, q_shape=(1, heads, S, head_dim), k_shape=(1, heads, S, head_dim),
                dtype="float32", grid=(2, 8, 8), grid_source="plan", n_text=n_text, n_before=n_before)


def blocks_for(plan, s):
    opts = CompactOptions(plan=plan)
    return site_blocks(opts, plan, s, site_layout(opts, plan, s))


def test_fitting_plan_gives_its_blocks():
    plan = small_plan()
    assert torch.equal(blocks_for(plan, site()), plan.sites["attn"].blocks)


@pytest.mark.parametrize("s, match", [
    (site(name="blocks.0.attn1"), r"plan has no site 'blocks.0.attn1'.*another model"),
    (site(heads=4), "heads 2 in the plan, 4 in the model"),
    (site(head_dim=32), "head_dim 16 in the plan, 32 in the model"),
    (site(S=140, n_text=12), "n_text 0 in the plan, 12 in the model"),
    (site(S=140, n_text=12, n_before=12), "seq_len 128 in the plan, 140 in the model"),
], ids=["site-missing", "heads", "head-dim", "n-text", "seq-len"])
def test_plan_for_another_model_names_the_difference(s, match):
    with pytest.raises(PlanError, match=match):
        blocks_for(small_plan(), s)


# ----------------------------------------------------------------------------------------------
# the same, through the backend


def compile_attention(options, heads=2):
    model = Wrapper(SelfAttention(dim=32, heads=heads)).eval()
    x = torch.randn(1, 128, 32)
    return model, x, torch.compile(model, backend="compact", options={**AS_PLANNED, "inner": "eager", **options})


def test_strict_backend_raises_on_mismatch(tmp_path):
    small_plan(heads=4).save(tmp_path / "p.safetensors")
    _, x, compiled = compile_attention({"plan": str(tmp_path / "p.safetensors")})
    with torch.no_grad(), raises_from_backend(PlanError, "heads 4 in the plan, 2 in the model"):
        compiled(x)


@pytest.mark.parametrize("plan, reason", [
    (small_plan(heads=4), "heads 4 in the plan, 2 in the model"),
    (small_plan(name="blocks.0.attn1"), "plan has no site 'attn'"),
], ids=["heads", "site-missing"])
def test_non_strict_backend_keeps_the_site_dense(tmp_path, plan, reason):
    plan.save(tmp_path / "p.safetensors")
    model, x, compiled = compile_attention({"plan": str(tmp_path / "p.safetensors"), "strict": False})
    with torch.no_grad():
        with pytest.warns(UserWarning, match=f"site attn stays dense: .*{reason}"):
            out = compiled(x)
        torch.testing.assert_close(out, model(x), rtol=1e-6, atol=1e-6)
    [entry] = compact_compile.report().sites
    assert entry["site"] == "attn" and not entry["rewritten"] and entry["density"] is None
    assert entry["reason"].startswith("plan mismatch") and reason in entry["reason"]
    assert entry["grid_source"] == "plan" and tuple(entry["grid"]) == plan.grid


def test_fitting_plan_file_is_used_by_the_backend(tmp_path):
    """A per-head plan read from a file: the compiled site equals masked dense attention."""
    plan = small_plan(heads=2, tile=(1, 8, 8), seed=3)
    blocks = plan.sites["attn"].blocks
    assert not blocks.all() and not torch.equal(blocks[0], blocks[1])  # sparse, and per head
    plan.save(tmp_path / "p.safetensors")
    model, x, compiled = compile_attention({"plan": str(tmp_path / "p.safetensors")})
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        out = compiled(x)
        with masked_sdpa({128: [model_order_mask(plan.layout("attn"), blocks)]}) as masked:
            ref = model.double()(x.double())
    assert masked == [128]
    assert rel_err(out, ref) < 1e-5
    assert rel_err(model.float()(x), ref) > 1e-2   # the mask matters: dense attention is far off
    [entry] = compact_compile.report().sites
    assert entry["rewritten"] and entry["grid_source"] == "plan" and tuple(entry["grid"]) == plan.grid
    assert entry["density"] == pytest.approx(plan.sites["attn"].density)
    assert entry["tile"] == (1, 8, 8) and entry["block_size"] == 64


def test_plan_for_another_resolution_is_refused(tmp_path):
    """The plan names this site but its grid holds 64 tokens, the model's sequence 128: strict is
    an error naming the site; non-strict keeps it dense with the reason."""
    plan = small_plan()
    plan.grid = (1, 8, 8)
    plan.sites["attn"].seq_len = 64
    plan.sites["attn"].blocks = plan.sites["attn"].blocks[:, :1, :1]
    plan.save(tmp_path / "p.safetensors")
    _, x, compiled = compile_attention({"plan": str(tmp_path / "p.safetensors")})
    with torch.no_grad(), raises_from_backend(PlanError, r"mask for site 'attn', which cannot be rewritten: 128 tokens"):
        compiled(x)
    torch._dynamo.reset()
    model, x, compiled = compile_attention({"plan": str(tmp_path / "p.safetensors"), "strict": False})
    with torch.no_grad(), pytest.warns(UserWarning, match="site attn stays dense"):
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-6, atol=1e-6)
    assert compact_compile.report().sites[0]["reason"].startswith("plan mismatch")
