"""What the backend did with every attention site it saw, in this process: scaled_dot_product_attention
and flex_attention calls, and attention kernels called directly (ring attention), which stay dense."""
from __future__ import annotations

import logging
import math

log = logging.getLogger("compact_compile")

_GRAPHS: list[list[dict]] = []
_QUANTIZED: list[dict] = []


class Report:
    def __init__(self, graphs: list[list[dict]], quantized: list[dict]):
        self.graphs = graphs
        self.quantized = quantized  # per graph compiled with a quantize option

    @property
    def sites(self) -> list[dict]:
        return [s for g in self.graphs for s in g]

    def __str__(self) -> str:
        rows = [("site", "kind", "q shape", "rewritten", "density", "kernel", "rectify", "dense steps",
                 "grid (source)", "reason")]
        for s in self.sites:
            grid = f"{tuple(s['grid'])} ({s['grid_source']})" if s["grid"] else ""
            dens = f"{s['density']:.3f}" if s["density"] is not None else ""
            rewritten = s["rewritten"]
            rows.append((s["site"], s["kind"], "x".join(map(str, s["q"])), "yes" if rewritten else "no", dens,
                         s.get("kernel", "") + (" fp8" if s.get("fp8") else "") if rewritten else "",
                         (s.get("rectify") or "no") if rewritten else "",
                         f"< {s['dense_steps']}" if rewritten and s.get("dense_steps") else "", grid, s["reason"] or ""))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        quant = [f"linear layers: {q['quantized']} quantized to {q['kind']}{self._fused(q)}, {q['kept']} kept "
                 f"(shape not a multiple of 16)" for q in self.quantized]
        return "\n".join([lines[0], "-" * len(lines[0])] + lines[1:] + [self.gained()] + quant)

    @staticmethod
    def _fused(quantized: dict) -> str:
        n = quantized.get("gelu_fused", 0)
        return f" ({n} with their GELU fused into the input's quantization)" if n else ""

    def gained(self) -> str:
        """One line: how much of the attention runs block-sparse, and from which step."""
        sparse = [s for s in self.sites if s["rewritten"]]
        if not sparse:
            return f"none of {len(self.sites)} attention sites rewritten (reasons above): attention runs as it was"
        up_to = "up to " if any(s.get("dynamic") for s in sparse) else ""
        skipped = self.skipped_work()
        warm = {s.get("dense_steps") or 0 for s in sparse}
        after = (f", after {max(warm)} dense warm-up steps" if warm == {max(warm)} and max(warm)
                 else ", after each site's dense warm-up steps" if len(warm) > 1 else "")
        fp8 = sum(bool(s.get("fp8")) for s in sparse)
        in_fp8 = f"; {fp8} of them in FP8 (e4m3) at their sparse steps" if fp8 else ""
        return (f"{len(sparse)} of {len(self.sites)} attention sites rewritten: {up_to}{skipped:.1%} of their "
                f"attention work skipped per call{after}{in_fp8}")

    def skipped_work(self) -> float:
        """Share of the rewritten sites' attention work their sparse steps skip (0 if none is rewritten).
        Each site is weighted by its work (batch·heads·queries·keys): a small site's density says little
        about the time saved. Online choice adds blocks per call: its floor (1 - drop per row) counts, so
        with a dynamic site this is an upper bound."""
        sparse = [s for s in self.sites if s["rewritten"]]
        work = [_attention_work(s) for s in sparse]
        return 1 - sum(w * s.get("min_density", s["density"]) for w, s in zip(work, sparse)) / max(1, sum(work))


def _attention_work(site: dict) -> int:
    """batch·heads·queries·keys of a site (q `[B, H, Sq, D]`, k `[B, H, Sk, D]`), 1 if its shapes are unknown."""
    q, k = site.get("q") or [], site.get("k") or []
    return math.prod(q[:-1]) * k[-2] if len(q) >= 3 and len(k) >= 3 else 1


def record(sites: list[dict]) -> None:
    _GRAPHS.append(sites)
    n = sum(s["rewritten"] for s in sites)
    log.info("compact: graph with %d attention sites, %d rewritten to block-sparse attention", len(sites), n)
    for s in sites:
        log.info("compact:   %s [%s] %s", s["site"], s["kind"],
                 f"density {s['density']:.3f}" if s["rewritten"] else f"dense: {s['reason']}")


def record_quantized(kind: str, quantized: int, kept: int, gelu_fused: int = 0) -> None:
    _QUANTIZED.append(dict(kind=kind, quantized=quantized, kept=kept, gelu_fused=gelu_fused))
    log.info("compact: %d linear layers quantized to %s (%d with the GELU before them fused into their input's "
             "quantization), %d kept", quantized, kind, gelu_fused, kept)


def report(clear: bool = False) -> Report:
    """Every attention site of every graph compiled with backend="compact" so far."""
    r = Report(list(_GRAPHS), list(_QUANTIZED))
    if clear:
        _GRAPHS.clear()
        _QUANTIZED.clear()
    return r
