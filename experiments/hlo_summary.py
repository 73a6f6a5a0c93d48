"""What each device kernel of a jitted program is, in terms of our source lines.

Reads an optimized HLO module (``XLA_FLAGS=--xla_dump_to=DIR --xla_dump_hlo_as_text`` writes
``*after_optimizations.txt``; device stage ``hlodump`` gzips them) and, optionally, a
``profile_cycle.py`` JSON of the same program. XLA:GPU names a fusion's kernel after the fusion
instruction, so every profiled kernel can be traced to its fusion, the ops fused into it and
the Python lines (file:line of qspec_jax / pallas_kernels) they came from.

    python3 experiments/hlo_summary.py --hlo module.after_optimizations.txt.gz \\
        --profile profile_llama3-8b_b1.json --config w4a16 --out summary.md

Without --profile: the kernel-launching instructions of each while-loop body (the decode
loops), counted per source line. Runs anywhere (text parsing only).
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys

# Instructions that launch nothing on the device (or are folded into their users).
NO_KERNEL = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while",
             "conditional", "call", "after-all", "partition-id", "replica-id", "opt-barrier",
             "add-dependency"}
# Ops too common inside fusions to say what a fusion does.
PLUMBING = NO_KERNEL | {"broadcast", "reshape", "convert", "copy", "transpose", "iota", "slice"}
OWN_CODE = ("qspec_jax/", "pallas_kernels/", "experiments/", "conversion/")

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<type>.*?)\s"
                    r"(?P<op>[a-z][\w\-]*)\((?P<rest>.*)$")
_COMP = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s.*\{\s*$")
_FRAME_TABLE = re.compile(r"^(?P<id>\d+)\s+\{(?P<body>.*)\}\s*$")
_NAME_TABLE = re.compile(r'^(?P<id>\d+)\s+"(?P<s>.*)"\s*$')


class Instr:
    __slots__ = ("name", "type", "op", "rest", "comp")

    def __init__(self, name, type_, op, rest, comp):
        self.name, self.type, self.op, self.rest, self.comp = name, type_, op, rest, comp

    def attr(self, key: str) -> str | None:
        m = re.search(r"\b" + re.escape(key) + r'=("(?:[^"\\]|\\.)*"|[^,\s}]+)', self.rest)
        return None if m is None else m.group(1).strip('"').lstrip("%")

    @property
    def shape(self) -> str:
        return re.sub(r"\{[^}]*\}", "", self.type)  # drop layouts


class Module:
    """The computations, instructions and source-location tables of one HLO text."""

    def __init__(self, text: str):
        self.comps: dict[str, list[Instr]] = {}
        self.by_name: dict[str, Instr] = {}
        self.by_kernel: dict[str, Instr] = {}
        tables = {"FileNames": {}, "FunctionNames": {}, "FileLocations": {}, "StackFrames": {}}
        table, comp = None, None
        for line in text.splitlines():
            s = line.strip()
            if comp is None and s in tables:
                table = s
                continue
            if table is not None:
                if not s:
                    table = None
                    continue
                m = _NAME_TABLE.match(s)
                if m and table in ("FileNames", "FunctionNames"):
                    tables[table][int(m["id"])] = m["s"]
                    continue
                m = _FRAME_TABLE.match(s)
                if m:
                    tables[table][int(m["id"])] = dict(re.findall(r"(\w+)=(\d+)", m["body"]))
                    continue
                table = None
            if comp is None:
                m = _COMP.match(line)
                if m and not line.startswith("HloModule"):
                    comp = m["name"]
                    self.comps[comp] = []
                continue
            if s == "}":
                comp = None
                continue
            m = _INSTR.match(line)
            if m:
                ins = Instr(m["name"], m["type"], m["op"], m["rest"], comp)
                self.comps[comp].append(ins)
                self.by_name.setdefault(ins.name, ins)
                # XLA:GPU names a kernel after its instruction with '.' and '-' made '_'.
                self.by_kernel.setdefault(re.sub(r"[.\-]", "_", ins.name), ins)
        self.files, self.funcs = tables["FileNames"], tables["FunctionNames"]
        self.locs, self.frames = tables["FileLocations"], tables["StackFrames"]

    def stack(self, ins: Instr) -> list[tuple[str, int, str]]:
        """(file, line, function) of the instruction's Python stack, innermost first."""
        out = []
        fid = ins.attr("stack_frame_id")
        seen = set()
        while fid is not None and fid not in seen and int(fid) in self.frames:
            seen.add(fid)
            fr = self.frames[int(fid)]
            loc = self.locs.get(int(fr.get("file_location_id", -1)), {})
            out.append((self.files.get(int(loc.get("file_name_id", -1)), "?"),
                        int(loc.get("line", 0)),
                        self.funcs.get(int(loc.get("function_name_id", -1)), "?")))
            parent = fr.get("parent_frame_id")
            fid = parent if parent != fid else None
        if not out and ins.attr("source_file"):  # older dumps: the location inline
            out.append((ins.attr("source_file"), int(ins.attr("source_line") or 0), "?"))
        return out

    def source(self, ins: Instr) -> str:
        """Our innermost source line that made the instruction (any line if none is ours)."""
        st = self.stack(ins)
        if not st and ins.op == "fusion":  # a fusion without metadata: its fused ops', root first
            for inner in reversed(self.comps.get(ins.attr("calls") or "", [])):
                st = self.stack(inner)
                if st:
                    break
        ours = [f for f in st if any(p in f[0] for p in OWN_CODE)]
        f = (ours or st or [None])[0]
        if f is None:  # no stack recorded: the op's JAX name, if any
            name = self.op_name(ins)
            return f"(op {'/'.join(name.split('/')[-2:])})" if name else "?"
        path = f[0]
        for p in OWN_CODE:
            if p in path:
                path = path[path.index(p):]
                break
        return f"{path}:{f[1]} ({f[2]})"

    def ops_inside(self, ins: Instr) -> collections.Counter:
        """The ops fused into a fusion (recursively), plumbing left out."""
        c = collections.Counter()
        todo, seen = [ins.attr("calls")], set()
        while todo:
            name = todo.pop()
            if not name or name in seen or name not in self.comps:
                continue
            seen.add(name)
            for i in self.comps[name]:
                if i.op not in PLUMBING:
                    c[i.op] += 1
                if i.op == "fusion":
                    todo.append(i.attr("calls"))
        return c

    def describe(self, ins: Instr) -> str:
        if ins.op == "fusion":
            inside = ", ".join(f"{k}" + (f" x{v}" if v > 1 else "")
                               for k, v in self.ops_inside(ins).most_common(6))
            return f"fusion {ins.attr('kind') or ''} [{inside}]"
        if ins.op == "custom-call":
            return f"custom-call {ins.attr('custom_call_target')}"
        return ins.op

    def op_name(self, ins: Instr) -> str:
        return ins.attr("op_name") or ""

    def while_bodies(self) -> list[str]:
        return [b for ins in self.by_name.values() if ins.op == "while"
                for b in [ins.attr("body")] if b in self.comps]

    def launches(self, comp: str) -> list[Instr]:
        """The instructions of a computation that run as device work (not fused ones)."""
        return [i for i in self.comps.get(comp, []) if i.op not in NO_KERNEL]


def read_text(path: str) -> str:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return f.read()


def profile_table(mod: Module, kernels: dict, per: float, top: int) -> tuple[list[str], list[str]]:
    """Markdown rows: the top kernels with their HLO, and device time per source line."""
    rows = ["| kernel | us/cycle | calls/cycle | what (HLO) | shape | source |", "|---|---|---|---|---|---|"]
    by_src = collections.defaultdict(lambda: [0.0, 0.0, set()])
    for name, (us, calls) in sorted(kernels.items(), key=lambda kv: -kv[1][0]):
        ins = mod.by_name.get(name) or mod.by_kernel.get(name)
        src = mod.source(ins) if ins else "(not an HLO instruction: a custom call's kernel or a copy)"
        what = mod.describe(ins) if ins else ""
        by_src[src][0] += us / per
        by_src[src][1] += calls / per
        by_src[src][2].add(what.split(" [")[0] if what else name)
        if len(rows) - 2 < top:
            rows.append(f"| `{name}` | {us / per:.1f} | {calls / per:.2f} | {what} | "
                        f"{ins.shape if ins else ''} | {src} |")
    src_rows = ["| source line | us/cycle | kernels/cycle | kinds |", "|---|---|---|---|"]
    for src, (us, n, kinds) in sorted(by_src.items(), key=lambda kv: -kv[1][0])[:top]:
        src_rows.append(f"| {src} | {us:.1f} | {n:.2f} | {', '.join(sorted(kinds))[:80]} |")
    return rows, src_rows


def body_table(mod: Module) -> list[str]:
    rows = []
    for body in mod.while_bodies():
        ls = mod.launches(body)
        rows += [f"while body `{body}`: {len(ls)} device-work instructions", "",
                 "| source line | instructions | kinds |", "|---|---|---|"]
        c = collections.defaultdict(list)
        for i in ls:
            c[mod.source(i)].append(mod.describe(i).split(" [")[0])
        for src, kinds in sorted(c.items(), key=lambda kv: -len(kv[1])):
            rows.append(f"| {src} | {len(kinds)} | "
                        f"{', '.join(f'{k} x{v}' for k, v in collections.Counter(kinds).most_common(4))} |")
        rows.append("")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hlo", required=True, help="an after_optimizations HLO text (.txt or .txt.gz)")
    p.add_argument("--profile", help="profile_cycle.py JSON of the same program")
    p.add_argument("--config", default="w4a16", help="the profile's configuration to read")
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--out", help="write the Markdown here (default: print)")
    a = p.parse_args(argv)
    mod = Module(read_text(a.hlo))
    if not mod.comps:
        sys.exit(f"{a.hlo}: no HLO computations found (want XLA's *after_optimizations.txt)")
    lines = [f"# Kernels of `{a.hlo.split('/')[-1]}`", ""]
    if a.profile:
        with open(a.profile) as f:
            prof = json.load(f)
        confs = prof.get("configs", {})
        if a.config not in confs:
            sys.exit(f"{a.profile}: no configuration {a.config!r} (has {', '.join(confs)})")
        c = confs[a.config]
        per = float(c.get("cycles") or 1)
        rows, src_rows = profile_table(mod, c["kernels"], per, a.top)
        lines += [f"Profile `{a.profile.split('/')[-1]}`, configuration {a.config}, per cycle "
                  f"({int(per)} cycles).", "", *rows, "", "Device time per source line:", "",
                  *src_rows, ""]
    else:
        lines += body_table(mod)
    text = "\n".join(lines) + "\n"
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
