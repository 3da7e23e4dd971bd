"""What a compiled program does per call, read from its optimized HLO text, loops included.

XLA's `cost_analysis()` counts a while loop's body once, and every phase of opdjax lives in loops
(the layer scan, the decode loop, scoring chunks, microbatches). This walks the HLO module the
TPU compiler produced and multiplies each computation by the trip counts of the loops around it:

  * trip count of a while loop: the constant its condition compares the induction variable with
    (`i < N`, what lax.scan / fori_loop / our decode loop lower to; the decode loop's early exit
    makes N an upper bound). A condition we cannot read counts once and is listed in `unknown`.
  * matmul FLOPs: 2 x output elements x contracted elements of every dot / convolution, inside
    fusions too; a Pallas kernel (custom call) contributes the cost estimate it declares.
  * HBM bytes: for every top-level instruction (fusion, copy, collective, ...) its operands plus
    its output, where a fusion operand that is only sliced inside counts as the slices it reads,
    and an in-place dynamic-update-slice counts as the update it writes (the decode step's KV
    cache write, the layer scan's stacked outputs).
  * collectives by kind: count and bytes moved (the output; reduce-scatter: the input).

All numbers are per device (the module is the per-device SPMD program).
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import re

import numpy as np

DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4,
               "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16,
               "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3b11fnuz": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "token": 0}
_ARRAY = re.compile(r"\b(" + "|".join(sorted(DTYPE_BYTES, key=len, reverse=True)) + r")\[([0-9,]*)\]")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
               "collective-broadcast", "ragged-all-to-all")
# Instructions that move no HBM bytes of their own.
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "call", "conditional",
         "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency", "domain",
         "get-dimension-size", "copy-done", "send-done", "recv-done"}


@dataclasses.dataclass
class Instr:
    name: str
    shape: str  # the result type as printed, e.g. "bf16[16,512]{1,0}" or "(s32[], f32[2])"
    opcode: str
    operands: list[str]
    attrs: str

    @property
    def bytes(self) -> float:
        return shape_bytes(self.shape)

    def attr(self, key: str) -> str | None:
        m = re.search(r"\b" + re.escape(key) + r"=(%?[\w.\-]+)", self.attrs)
        return m.group(1).lstrip("%") if m else None


@dataclasses.dataclass
class Computation:
    name: str
    instrs: list[Instr]
    params: dict[str, str]  # parameter name -> type

    def __post_init__(self):
        self.by_name = {i.name: i for i in self.instrs}

    @property
    def root(self) -> Instr:
        return self.instrs[-1]


def shape_dims(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    """Every array in a (possibly tuple) type: [(dtype, dims)]."""
    return [(d, tuple(int(x) for x in s.split(",") if x)) for d, s in _ARRAY.findall(shape)]


def shape_bytes(shape: str) -> float:
    return sum(DTYPE_BYTES[d] * math.prod(dims) for d, dims in shape_dims(shape))


def _matching(text: str, start: int, open_ch: str, close_ch: str) -> int:
    """Index just past the bracket that closes the one at `start`."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == open_ch:
            depth += 1
        elif text[i] == close_ch:
            depth -= 1
            if depth == 0:
                return i + 1
    raise ValueError(f"unbalanced {open_ch}{close_ch} in HLO line: {text[:120]}")


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets."""
    out, depth, cur = [], 0, []
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        out.append("".join(cur).strip())
    return out


def _parse_instr(line: str) -> Instr | None:
    line = line.strip()
    if line.startswith("ROOT "):
        line = line[5:]
    if not line.startswith("%") or " = " not in line:
        return None
    name, rest = line.split(" = ", 1)
    if rest.startswith("("):
        end = _matching(rest, 0, "(", ")")
        shape, rest = rest[:end], rest[end:].lstrip()
    else:
        shape, rest = rest.split(" ", 1)
    # the layout braces may follow the shape after a space-free run; skip to the opcode
    m = re.match(r"([\w\-]+)\(", rest)
    if not m:
        return None
    opcode = m.group(1)
    end = _matching(rest, m.end() - 1, "(", ")")
    operand_text = rest[m.end():end - 1]
    operands = []
    for op in _split_top(operand_text):
        ref = re.findall(r"%([\w.\-]+)", op)
        operands.append(ref[-1] if ref else op)
    return Instr(name.lstrip("%"), shape, opcode, operands, rest[end:])


def parse_module(text: str) -> tuple[dict[str, Computation], str]:
    """Computations by name, and the entry computation's name."""
    comps, entry = {}, None
    cur_name, cur_instrs, cur_params = None, [], {}
    for line in text.splitlines():
        stripped = line.strip()
        if cur_name is None:
            m = re.match(r"(ENTRY\s+)?%([\w.\-]+)\s*\((.*)\)\s*->.*\{\s*$", stripped)
            if m:
                cur_name, cur_instrs = m.group(2), []
                cur_params = {}
                for p in _split_top(m.group(3)):
                    if ":" in p:
                        k, v = p.split(":", 1)
                        cur_params[k.strip()] = v.strip()
                if m.group(1):
                    entry = cur_name
            continue
        if stripped == "}":
            comps[cur_name] = Computation(cur_name, cur_instrs, cur_params)
            cur_name = None
            continue
        ins = _parse_instr(stripped)
        if ins is not None:
            cur_instrs.append(ins)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return comps, entry


# ------------------------------------------------------------------------------ trip counts
def _called(ins: Instr) -> list[str]:
    names = []
    for key in ("calls", "body", "condition", "to_apply"):
        v = ins.attr(key)
        if v:
            names.append(v)
    m = re.search(r"branch_computations=\{([^}]*)\}", ins.attrs)
    if m:
        names += [n.strip().lstrip("%") for n in m.group(1).split(",")]
    for key in ("true_computation", "false_computation"):
        v = ins.attr(key)
        if v:
            names.append(v)
    return names


def _constants(comps, comp: Computation, seen=None) -> list[int]:
    """Integer scalar constants compared with LT/LE/NE anywhere in a condition (fusions included)."""
    seen = seen or set()
    if comp.name in seen:
        return []
    seen.add(comp.name)
    found = []
    for ins in comp.instrs:
        if ins.opcode == "compare":
            direction = re.search(r"direction=(\w+)", ins.attrs)
            for op in ins.operands:
                src = comp.by_name.get(op)
                if src is not None and src.opcode == "constant" and re.match(r"[su](32|64)\[\]", src.shape):
                    value = re.fullmatch(r"(-?\d+)", src.operands[0]) if src.operands else None
                    if value and direction and direction.group(1) in ("LT", "NE", "GT"):
                        found.append(int(value.group(1)))
                    elif value and direction and direction.group(1) in ("LE", "GE"):
                        found.append(int(value.group(1)) + 1)
        for sub in _called(ins):
            if sub in comps:
                found += _constants(comps, comps[sub], seen)
    return found


def trip_count(comps, while_ins: Instr) -> int | None:
    """N of a loop whose condition is `i < N` (i from 0); None when the condition says nothing."""
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', while_ins.attrs)
    if m:
        return int(m.group(1))
    cond = comps.get(while_ins.attr("condition") or "")
    if cond is None:
        return None
    values = [v for v in _constants(comps, cond) if v > 0]
    return max(values) if values else None


# ------------------------------------------------------------------------------------- costs
def _dot_flops(ins: Instr, comp: Computation, comps) -> float:
    out = sum(math.prod(d) for _, d in shape_dims(ins.shape))
    if ins.opcode == "dot":
        lhs = _operand_dims(ins.operands[0], comp)
        m = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", ins.attrs)
        contracted = math.prod(lhs[int(i)] for i in m.group(1).split(",") if i) if (m and lhs) else 1
        return 2.0 * out * contracted
    return _conv_flops(ins, comp)


def _conv_flops(ins: Instr, comp: Computation) -> float:
    """HloCostAnalysis' count: 2 x batch x input features (per group) x output features x, per
    spatial dimension, the (output, kernel) position pairs that land on a real input element
    (not padding, not a hole of lhs dilation). The TPU compiler writes batched matmuls as
    convolutions with dilated windows, so counting window elements alone would overcount."""
    lhs, rhs = _operand_dims(ins.operands[0], comp), _operand_dims(ins.operands[1], comp)
    out = shape_dims(ins.shape)[0][1] if shape_dims(ins.shape) else None
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", ins.attrs)
    if not (lhs and rhs and out and labels):
        return 0.0
    l_lab, r_lab, o_lab = labels.groups()
    window = re.search(r"window=\{([^}]*)\}", ins.attrs)
    fields = dict(kv.split("=", 1) for kv in window.group(1).split()) if window else {}
    spatial = sorted(ch for ch in l_lab if ch.isdigit())
    n = len(spatial)
    parse = lambda key, default: ([int(x) for x in fields[key].split("x")] if key in fields  # noqa: E731
                                  else [default] * n)
    sizes, strides = parse("size", 1), parse("stride", 1)
    lhs_dil, rhs_dil = parse("lhs_dilate", 1), parse("rhs_dilate", 1)
    pads = [tuple(int(v) for v in p.split("_")) for p in fields["pad"].split("x")] if "pad" in fields else [(0, 0)] * n
    valid = 1.0
    for d, ch in enumerate(spatial):
        in_size = lhs[l_lab.index(ch)]
        out_size = out[o_lab.index(ch)]
        k = np.arange(sizes[d])[None, :]
        o = np.arange(out_size)[:, None]
        pos = o * strides[d] + k * rhs_dil[d] - pads[d][0]
        dilated = (in_size - 1) * lhs_dil[d] + 1
        valid *= float(np.count_nonzero((pos >= 0) & (pos < dilated) & (pos % lhs_dil[d] == 0)))
    batch = lhs[l_lab.index("b")]
    fin, fout = rhs[r_lab.index("i")], rhs[r_lab.index("o")]
    groups = int(ins.attr("batch_group_count") or 1)
    return 2.0 * batch * fin * fout * valid / groups


def _operand_dims(name: str, comp: Computation) -> tuple[int, ...] | None:
    src = comp.by_name.get(name)
    shape = src.shape if src is not None else comp.params.get(name)
    dims = shape_dims(shape) if shape else []
    return dims[0][1] if dims else None


def _custom_call_cost(ins: Instr) -> tuple[float, float]:
    """(flops, bytes) a Pallas/Mosaic kernel declares in its backend config, else (0, 0)."""
    flops = re.search(r'\\?"flops\\?"\s*:\s*\\?"?(\d+)', ins.attrs)
    nbytes = re.search(r'\\?"bytes_accessed\\?"\s*:\s*\\?"?(\d+)', ins.attrs)
    return (float(flops.group(1)) if flops else 0.0, float(nbytes.group(1)) if nbytes else 0.0)


# Matmuls per attention-score element in the splash kernels (flash style, scores recomputed):
# forward QK^T and PV; dq recomputes QK^T, then dO V^T and dS K; dkv recomputes QK^T, then
# dO V^T, P^T dO and dS^T Q.
_SPLASH_MATMULS = (("dkv", 4), ("dq", 3), ("fwd", 2))


def _splash_flops(ins: Instr, comp: Computation) -> float:
    """A splash attention kernel declares no cost XLA can read: count it from q [B, H, T, hd] as
    causal self-attention (half of the T x T scores), 2 FLOPs per multiply-add."""
    n = next((k for key, k in _SPLASH_MATMULS if key in ins.name), 0)
    for op in ins.operands:
        src = comp.by_name.get(op)
        dims = shape_dims(src.shape if src is not None else comp.params.get(op, ""))
        if dims and len(dims[0][1]) >= 3 and dims[0][0] in ("bf16", "f32", "f16"):
            q = dims[0][1]
            return n * 2.0 * math.prod(q) * q[-2] / 2
    return 0.0


def _fused_flops(comps, comp: Computation) -> float:
    total = 0.0
    for ins in comp.instrs:
        if ins.opcode in ("dot", "convolution"):
            total += _dot_flops(ins, comp, comps)
        elif ins.opcode == "fusion":
            sub = comps.get(ins.attr("calls") or "")
            if sub is not None:
                total += _fused_flops(comps, sub)
        elif ins.opcode == "custom-call":
            total += _custom_call_cost(ins)[0]
    return total


def _users_and_params(fused: Computation):
    """(instructions using each value, parameter name of each operand index) of a fused computation."""
    users = collections.defaultdict(list)
    for f in fused.instrs:
        for op in f.operands:
            users[op].append(f)
    # parameter instructions are named like the signature's parameters
    by_index = {}
    for f in fused.instrs:
        if f.opcode == "parameter":
            m = re.match(r"(\d+)", f.operands[0]) if f.operands else None
            if m:
                by_index[int(m.group(1))] = f.name
    param_names = list(fused.params)
    return users, lambda i: by_index.get(i, param_names[i] if i < len(param_names) else None)


def _sliced_bytes(comps, fused: Computation, pname: str | None, users, depth: int = 0) -> float | None:
    """Bytes read from parameter `pname` of `fused` when every use only slices it, directly or as
    an operand of a nested fusion that only slices it (the TPU compiler nests the slice of a
    block out of a KV cache inside the attention fusion); None when some use reads it whole."""
    uses = users.get(pname, []) if pname is not None else []
    if not uses or depth > 8:
        return None
    total = 0.0
    for u in uses:
        if u.opcode in ("dynamic-slice", "slice", "gather") and u.operands[0] == pname:
            total += u.bytes
        elif u.opcode == "fusion" and u.operands.count(pname) == 1 and comps.get(u.attr("calls") or ""):
            inner = comps[u.attr("calls")]
            inner_users, param_at = _users_and_params(inner)
            got = _sliced_bytes(comps, inner, param_at(u.operands.index(pname)), inner_users, depth + 1)
            if got is None:
                return None
            total += got
        else:
            return None
    return total


def _fusion_bytes(comps, ins: Instr, comp: Computation) -> float:
    """Bytes a fusion reads and writes: sliced operands (also inside nested fusions) count their
    slices; an in-place dynamic-update-slice root counts its update."""
    fused = comps.get(ins.attr("calls") or "")
    operand_bytes = [_value_bytes(op, comp) for op in ins.operands]
    out_bytes = ins.bytes
    if fused is None:
        return sum(operand_bytes) + out_bytes
    users, param_at = _users_and_params(fused)
    root = fused.root
    inplace = None
    if root.opcode == "dynamic-update-slice":
        inplace = root.operands[0]
        out_bytes = _value_bytes(root.operands[1], fused)
    total = out_bytes
    for i, nbytes in enumerate(operand_bytes):
        pname = param_at(i)
        uses = users.get(pname, [])
        if pname is not None and pname == inplace and all(u is root for u in uses):
            continue  # the buffer updated in place: only the update is written
        sliced = _sliced_bytes(comps, fused, pname, users)
        total += nbytes if sliced is None else sliced
    return total


def _value_bytes(name: str, comp: Computation) -> float:
    src = comp.by_name.get(name)
    if src is not None:
        return src.bytes
    return shape_bytes(comp.params.get(name, ""))


@dataclasses.dataclass
class ProgramCost:
    flops: float  # matmul FLOPs per call, loops applied
    bytes: float  # HBM bytes per call, loops applied
    collectives: dict  # kind -> {"count": n, "bytes": b} per call, loops applied
    loops: list  # [{"trip": n or None, "depth": d}] outermost first
    unknown_loops: int  # loops whose trip count could not be read (counted once)
    flops_once: float  # the same with every loop body counted once (what XLA's cost_analysis does)
    top_flops: list = dataclasses.field(default_factory=list)  # [(flops per call, what)] largest first
    top_bytes: list = dataclasses.field(default_factory=list)  # [(bytes per call, what)]


def _what(ins: Instr, mult: float) -> str:
    op = re.search(r'op_name="([^"]*)"', ins.attrs)
    return f"{ins.opcode} {ins.shape.split('{')[0][:60]} x{mult:g} ({op.group(1)[-90:] if op else ins.name})"


def analyze(text: str, top: int = 8, parsed=None) -> ProgramCost:
    """`parsed`: parse_module(text), when the caller already has it."""
    comps, entry = parsed or parse_module(text)
    f_items, b_items = [], []
    flops = nbytes = flops_once = 0.0
    coll = collections.defaultdict(lambda: {"count": 0, "bytes": 0.0})
    loops, unknown = [], 0

    def walk(name: str, mult: float, depth: int, stack: tuple):
        nonlocal flops, nbytes, flops_once, unknown
        if name in stack or name not in comps:
            return
        comp = comps[name]
        for ins in comp.instrs:
            op = ins.opcode
            if op == "while":
                n = trip_count(comps, ins)
                loops.append({"trip": n, "depth": depth})
                if n is None:
                    unknown += 1
                inner = mult * (n or 1)
                walk(ins.attr("body"), inner, depth + 1, stack + (name,))
                walk(ins.attr("condition"), inner, depth + 1, stack + (name,))
                continue
            if op in ("call", "conditional"):
                for sub in _called(ins):
                    walk(sub, mult, depth, stack + (name,))
                continue
            base = op.removesuffix("-start").removesuffix("-done")
            if base in COLLECTIVES:
                if op.endswith("-done"):
                    continue
                moved = _value_bytes(ins.operands[0], comp) if base == "reduce-scatter" else _async_out(ins)
                coll[base]["count"] += mult
                coll[base]["bytes"] += mult * moved
                nbytes += mult * (moved + sum(_value_bytes(o, comp) for o in ins.operands))
                continue
            if op in _FREE:
                continue
            if op == "fusion":
                sub = comps.get(ins.attr("calls") or "")
                f = _fused_flops(comps, sub) if sub is not None else 0.0
                b = _fusion_bytes(comps, ins, comp)
            elif op in ("dot", "convolution"):
                f = _dot_flops(ins, comp, comps)
                b = ins.bytes + sum(_value_bytes(o, comp) for o in ins.operands)
            elif op == "custom-call":
                f, b = _custom_call_cost(ins)
                if not f and "splash" in ins.name:
                    f = _splash_flops(ins, comp)
                if not b:
                    b = ins.bytes + sum(_value_bytes(o, comp) for o in ins.operands)
            elif op == "copy-start":  # an async copy: reads the source, writes the destination
                f, b = 0.0, 2 * _value_bytes(ins.operands[0], comp)
            elif op == "dynamic-update-slice":
                f, b = 0.0, 2 * _value_bytes(ins.operands[1], comp)
            elif op in ("dynamic-slice", "slice"):
                f, b = 0.0, 2 * ins.bytes
            else:
                f, b = 0.0, ins.bytes + sum(_value_bytes(o, comp) for o in ins.operands)
            flops += mult * f
            flops_once += f
            nbytes += mult * b
            if f:
                f_items.append((mult * f, _what(ins, mult)))
            b_items.append((mult * b, _what(ins, mult)))

    walk(entry, 1.0, 0, ())
    largest = lambda items: sorted(items, key=lambda x: -x[0])[:top]  # noqa: E731
    return ProgramCost(flops, nbytes, {k: dict(v) for k, v in coll.items()}, loops, unknown, flops_once,
                       largest(f_items), largest(b_items))


def _async_out(ins: Instr) -> float:
    """Bytes an (async) collective produces: the last array of a -start tuple, else its output."""
    dims = shape_dims(ins.shape)
    if ins.opcode.endswith("-start") and len(dims) > 1:
        d, s = dims[-1]
        return DTYPE_BYTES[d] * math.prod(s)
    return ins.bytes


def to_json(cost: ProgramCost) -> str:
    return json.dumps(dataclasses.asdict(cost))


# ------------------------------------------------------------------------ argument layouts
_LAYOUT_ARRAY = re.compile(r"\b(" + "|".join(sorted(DTYPE_BYTES, key=len, reverse=True)) +
                           r")\[([0-9,]*)\](?:\{([0-9,]*)(?::([^}]*))?\})?")


def entry_parameters(text: str) -> list[tuple[str, tuple[int, ...], float]]:
    """(dtype, per-device dims, bytes in HBM) of each entry parameter, in order, from the module's
    entry_computation_layout: the bytes include the padding of the TPU tiles the compiler chose."""
    m = re.search(r"entry_computation_layout=\{\((.*?)\)->", text)
    if not m:
        return []
    out = []
    for dt, dims, minor_to_major, rest in _LAYOUT_ARRAY.findall(m.group(1)):
        shape = tuple(int(x) for x in dims.split(",") if x)
        order = [int(x) for x in minor_to_major.split(",") if x] or list(range(len(shape)))[::-1]
        out.append((dt, shape, tiled_bytes(dt, shape, order, rest)))
    return out


def tiled_bytes(dtype: str, shape: tuple[int, ...], minor_to_major: list[int], layout_rest: str) -> float:
    """Bytes of an array under a TPU tiled layout: the first tile T(a,b) (or T(n)) pads the most
    minor dimensions to its multiples."""
    tile = re.search(r"T\(([0-9,]+)\)", layout_rest or "")
    dims = [shape[i] for i in minor_to_major]  # most minor first
    if not dims:
        dims = [1]
    if tile:
        t = [int(x) for x in tile.group(1).split(",")][::-1]  # most minor first
        if len(dims) < len(t):  # a scalar / short vector fills one tile
            dims = dims + [1] * (len(t) - len(dims))
        for i, size in enumerate(t):
            dims[i] = -(-dims[i] // size) * size
    return DTYPE_BYTES[dtype] * math.prod(dims)
