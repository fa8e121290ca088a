"""What the backend did with every attention site it saw, in this process: scaled_dot_product_attention
and flex_attention calls, and attention kernels called directly (ring attention), which stay dense."""
from __future__ import annotations

import logging

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
        rows = [("site", "kind", "q shape", "rewritten", "density", "grid (source)", "reason")]
        for s in self.sites:
            grid = f"{tuple(s['grid'])} ({s['grid_source']})" if s["grid"] else ""
            dens = f"{s['density']:.3f}" if s["density"] is not None else ""
            rows.append((s["site"], s["kind"], "x".join(map(str, s["q"])), "yes" if s["rewritten"] else "no",
                         dens, grid, s["reason"] or ""))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        quant = [f"linear layers: {q['quantized']} quantized to {q['kind']}, {q['kept']} kept (shape not a "
                 f"multiple of 16)" for q in self.quantized]
        return "\n".join([lines[0], "-" * len(lines[0])] + lines[1:] + quant)


def record(sites: list[dict]) -> None:
    _GRAPHS.append(sites)
    n = sum(s["rewritten"] for s in sites)
    log.info("compact: graph with %d attention sites, %d rewritten to block-sparse attention", len(sites), n)
    for s in sites:
        log.info("compact:   %s [%s] %s", s["site"], s["kind"],
                 f"density {s['density']:.3f}" if s["rewritten"] else f"dense: {s['reason']}")


def record_quantized(kind: str, quantized: int, kept: int) -> None:
    _QUANTIZED.append(dict(kind=kind, quantized=quantized, kept=kept))
    log.info("compact: %d linear layers quantized to %s, %d kept", quantized, kind, kept)


def report(clear: bool = False) -> Report:
    """Every attention site of every graph compiled with backend="compact" so far."""
    r = Report(list(_GRAPHS), list(_QUANTIZED))
    if clear:
        _GRAPHS.clear()
        _QUANTIZED.clear()
    return r
