"""What a `dsq quantize` run did, by role: formats, sizes, errors; rendered as a rich table."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from rich import box
from rich.table import Table

from dsq.inspect import size


@dataclass
class Report:
    """What a run did; `table()` renders it."""

    out: Path
    tensors: dict[str, dict]  # tensor -> role, format, bytes_in, bytes_out, rel_err, sqnr_db
    seconds: float
    bytes_done: int  # source bytes converted by this run (resumed shards excluded)
    shards: int
    resumed: int
    roles: dict[str, dict] = field(init=False)

    def __post_init__(self) -> None:
        roles: dict[str, dict] = defaultdict(lambda: {"formats": set(), "n": 0, "in": 0, "out": 0, "errs": []})
        for info in self.tensors.values():
            r = roles[info["role"]]
            r["formats"].add(info["format"])
            r["n"] += 1
            r["in"] += info["bytes_in"]
            r["out"] += info["bytes_out"]
            if info["rel_err"] is not None:
                r["errs"].append(info)
        self.roles = dict(roles)

    def table(self) -> Table:
        t = Table(title=f"dsq quantize -> {self.out}", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
                  collapse_padding=True)
        for col in ("role", "format", "tensors", "before", "after", "ratio", "err mean", "err max", "SQNR"):
            t.add_column(col, justify="left" if col in ("role", "format") else "right", no_wrap=True)
        for role, r in sorted(self.roles.items(), key=lambda kv: -kv[1]["in"]):
            errs = [e["rel_err"] for e in r["errs"]]
            sq = [e["sqnr_db"] for e in r["errs"] if e["sqnr_db"] is not None]
            t.add_row(role, ",".join(sorted(r["formats"])), str(r["n"]), size(r["in"]), size(r["out"]),
                      f"{r['in'] / max(r['out'], 1):.2f}x", f"{sum(errs) / len(errs):.2%}" if errs else "-",
                      f"{max(errs):.2%}" if errs else "-", f"{sum(sq) / len(sq):.1f}" if sq else "-")
        size_in = sum(r["in"] for r in self.roles.values())
        size_out = sum(r["out"] for r in self.roles.values())
        t.add_section()
        t.add_row("total", "", str(len(self.tensors)), size(size_in), size(size_out),
                  f"{size_in / max(size_out, 1):.2f}x", "", "", "")
        if self.resumed == self.shards:
            t.caption = (f"{self.out} is complete: all {self.shards} shards were already written and match their "
                         "sha256; nothing was converted")
        else:
            rate = self.bytes_done / self.seconds / 1e6 if self.seconds else 0.0
            t.caption = (f"{self.shards} shards ({self.resumed} resumed) in {self.seconds:.1f} s, {rate:.0f} MB/s "
                         "of source converted")
        t.caption += "; err = relative Frobenius error of a tensor, SQNR in dB"
        return t
