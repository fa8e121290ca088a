"""The fidelity harness's observer (benchmarks/fidelity.py): per call of every rewritten site, the
fraction of blocks computed and the relative error of the site's output against dense attention on
the same inputs; for an FP8 site also against the same site in the inputs' dtype (the bf16 sparse
output, same blocks).

An FP8 site's op receives the e4m3 tiles and also q, k, v as the graph made them (for its dense
steps): the probe puts those in tile order to measure what quantizing cost.
"""
import torch.nn.functional as F

from compact_compile.kernels.rectified import merge_blocks
from compact_compile.layout import tile_index
from compact_compile.schedule import CLOCK

from benchmarks.timing import rel_diff


class Probe:
    """observer option: records one dict(site, step, density, error) per site call, and for FP8 sites
    error_vs_sparse (FP8 output vs the site's output in the inputs' dtype)."""

    def __init__(self):
        self.calls = []

    def __call__(self, spec, site):
        return ProbedSite(self, spec, site)

    def summary(self, dense_steps):
        """Densities over all steps and over the sparse ones; per site, the mean error against dense
        over the sparse steps (dense steps are exact, FP8 sites' too: they run in the inputs' dtype),
        and for FP8 sites against their output in the inputs' dtype, over the sparse steps."""
        sparse = [c for c in self.calls if not dense_steps or (c["step"] is not None and c["step"] >= dense_steps)]
        sites = sorted({c["site"] for c in self.calls}, key=lambda s: [int(p) if p.isdigit() else p
                                                                        for p in s.split(".")])
        out = dict(density=mean(c["density"] for c in self.calls),
                   density_sparse_steps=mean(c["density"] for c in sparse),
                   layer_error={s: mean(c["error"] for c in sparse if c["site"] == s) for s in sites})
        fp8 = [c for c in sparse if "error_vs_sparse" in c]
        if fp8:
            out["layer_error_vs_bf16_sparse"] = {s: mean(c["error_vs_sparse"] for c in fp8 if c["site"] == s)
                                                 for s in sites}
        return out


class ProbedSite:
    """The site as users get it (fused rectification, in-graph merges, FP8 tiles and all), measured per call."""

    def __init__(self, probe, spec, site):
        self.probe, self.spec, self.site = probe, spec, site

    def _record(self, out, q, k, v, scale, pools, key_valid, **extra):
        mask = None if key_valid is None else key_valid[:, None, None, :]
        dense = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        density = self.site.estimate(q, k, v, scale, pools, key_valid)[0].float().mean().item()
        self.probe.calls.append(dict(site=self.spec.name, step=CLOCK.current, density=density,
                                     error=rel_diff(out, dense), **extra))

    def __call__(self, q, k, v, scale=None, pools=None, key_valid=None):
        out = self.site(q, k, v, scale, pools, key_valid)
        self._record(out, q, k, v, scale, pools, key_valid)
        return out

    def parts(self, q, k, v, scale, pools, key_valid=None):
        o, r, o_bar = self.site.parts(q, k, v, scale, pools, key_valid)
        self._record(merge_blocks(o, r, o_bar, self.spec.layout.block_size), q, k, v, scale, pools, key_valid)
        return o, r, o_bar

    def fp8(self, tiles, scale, pools, key_valid, dtype, unquantized):
        out = self.site.fp8(tiles, scale, pools, key_valid, dtype, unquantized)
        source = tile_index(self.spec.layout, tiles.q.device)
        inputs = tuple(x.index_select(-2, source) for x in unquantized)      # tile order, as the site's
        sparse = self.site(*inputs, scale, pools, key_valid)   # same blocks (same pools), in q's dtype
        self._record(out, *inputs, scale, pools, key_valid, error_vs_sparse=rel_diff(out, sparse))
        return out


def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")
