"""Lint: every host/device crossing goes through `opdjax/multihost.py` (the pod boundary).

On one process `np.asarray(global_array)` works, so a stray crossing passes every single-process
test and then raises on a pod ("Fetching value for jax.Array that spans non-addressable
devices") or, worse, hangs it (a collective only some processes call). Two rules over the
source of the package:
1. the low-level crossing APIs (`jax.device_get`, `process_allgather`, `make_array_from_*`,
   `addressable_shards`/`addressable_data`, `multihost_utils`) appear only in the boundary module,
   or in the few places listed in ALLOWED with the reason they are pod-correct;
2. no `np.asarray` / `np.array` / `float` / `int` / `bool` / `.tolist()` / `.item()` of a field of
   the device-side results (the sampler's Rollout, the teacher's scores, the release decision,
   the mixed rollout, ...), whose arrays are sharded over the mesh: those must go through
   `multihost.to_host` / `rows_of`.
The rules are checked on known-bad snippets too, so the lint itself cannot silently pass.
"""
import ast
import pathlib
import re

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "opdjax"
BOUNDARY = "opdjax/multihost.py"

CROSSING = re.compile(r"jax\.device_get\(|process_allgather\(|make_array_from_process_local_data\(|"
                      r"make_array_from_callback\(|\.addressable_shards\b|\.addressable_data\(|multihost_utils")
# file -> (pattern allowed there, why it is pod-correct)
ALLOWED = {
    "opdjax/models/hf_io.py": ("make_array_from_callback(",
                               "each process reads exactly its devices' slices of the checkpoint file"),
    "opdjax/train/checkpoint.py": ("multihost_utils", "barriers and the preemption sync point, called on "
                                                      "every process"),
    "opdjax/sharding.py": ("", ""),
}


def _device_fields() -> set[str]:
    """Fields of the NamedTuples whose arrays live on the mesh."""
    from opdjax.rollout.mixed import MixedRollout
    from opdjax.rollout.sampler import Rollout
    from opdjax.teachability.changepoint import ChangePoint
    from opdjax.teachability.margins import AllMargins, Margins
    from opdjax.teachability.rule import ReleaseDecision
    from opdjax.teachability.scoring import TeacherScores
    fields = set()
    for cls in (Rollout, TeacherScores, ReleaseDecision, ChangePoint, Margins, AllMargins, MixedRollout):
        fields.update(cls._fields)
    return fields - {"segments"}  # host-side already (each process's own sentence split)


HOST_CALLS = {("np", "asarray"), ("np", "array"), ("numpy", "asarray"), ("numpy", "array"), (None, "float"),
              (None, "int"), (None, "bool"), (None, "list")}


def _call_name(func):
    if isinstance(func, ast.Name):
        return (None, func.id)
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        return (func.value.id, func.attr)
    return None


def _device_attr(node, fields):
    """The device field `node` reads (x.tokens, x.tokens[...], x.tokens.sum()), or None."""
    while isinstance(node, (ast.Subscript, ast.Call)):
        node = node.value if isinstance(node, ast.Subscript) else node.func
        if isinstance(node, ast.Attribute) and node.attr not in fields:
            node = node.value  # a method such as .sum / .astype: look at what it is called on
    if isinstance(node, ast.Attribute) and node.attr in fields:
        return node.attr
    return None


def _pragma_lines(source: str) -> set[int]:
    """Lines marked `# host:` (with the reason the value is a host array, e.g. a Segments field)."""
    return {i for i, line in enumerate(source.splitlines(), 1) if "# host:" in line}


def device_reads(source: str, fields: set[str]) -> list[tuple[int, str]]:
    """(line, text) of every host conversion of a device-result field in `source`, by line."""
    out = []
    skip = _pragma_lines(source)
    for node in ast.walk(ast.parse(source)):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Call):
            name = _call_name(node.func)
            if name in HOST_CALLS and node.args:
                f = _device_attr(node.args[0], fields)
                if f:
                    out.append((node.lineno, f"{ast.unparse(node)[:100]}"))
            if isinstance(node.func, ast.Attribute) and node.func.attr in ("tolist", "item"):
                f = _device_attr(node.func.value, fields)
                if f:
                    out.append((node.lineno, f"{ast.unparse(node)[:100]}"))
    return sorted(set(out))


def crossings(source: str) -> list[tuple[int, str]]:
    return [(i, line.strip()) for i, line in enumerate(source.splitlines(), 1)
            if CROSSING.search(line) and not line.lstrip().startswith("#")]


def _sources():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield str(path.relative_to(PACKAGE.parent)), path.read_text()


def test_the_lint_flags_known_bad_code():
    fields = _device_fields()
    bad = ("import numpy as np\nimport jax\n"
           "toks = np.asarray(roll.tokens)\n"
           "n = int(np.asarray(roll.mask).sum())\n"
           "m = float(scores.sampled_logp[mask].sum())\n"
           "w = decision.weights.tolist()\n"
           "x = jax.device_get(out)\n")
    assert [line for line, _ in device_reads(bad, fields)] == [3, 4, 5, 6]
    assert device_reads(bad.replace("roll.tokens)", "roll.tokens)  # host: a test"), fields)[0][0] == 4
    assert [line for line, _ in crossings(bad)] == [7]
    good = ("from opdjax import multihost\n"
            "toks = multihost.to_host(roll.tokens)\n"
            "ids, mask = multihost.rows_of((roll.tokens, roll.mask), rows)\n"
            "n = int(host['response_mask'].sum())\n")
    assert device_reads(good, fields) == [] and crossings(good) == []


def test_every_crossing_goes_through_the_boundary():
    fields = _device_fields()
    problems = []
    for name, source in _sources():
        if name == BOUNDARY:
            continue
        allowed, _why = ALLOWED.get(name, (None, None))
        for line, text in crossings(source):
            if allowed is None or allowed not in text:
                problems.append(f"{name}:{line}: {text}")
        for line, text in device_reads(source, fields):
            problems.append(f"{name}:{line}: {text}")
    assert not problems, ("host/device crossings outside opdjax/multihost.py (use multihost.to_host / rows_of / "
                          "to_global / from_local_rows):\n" + "\n".join(problems))


@pytest.mark.parametrize("name", sorted(ALLOWED))
def test_allowed_exceptions_still_exist(name):
    """An allowance that is no longer needed is removed, so the list stays honest."""
    allowed, _ = ALLOWED[name]
    source = (PACKAGE.parent / name).read_text()
    if allowed:
        assert any(allowed in text for _, text in crossings(source)), f"{name} no longer needs {allowed!r}"
