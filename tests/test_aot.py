"""The `compile` job: every phase compiled for TPU topologies by the real TPU compiler (libtpu,
in the test extra), on abstract devices; and the HLO walk that applies loop trip counts.

Independent checks: XLA's own cost analysis on loop-free programs (our FLOP count must equal
its count for matmul-only programs), arithmetic on known loops (trip counts x one body), the
shapes and shardings we give the arguments (the compiled parameters must have exactly those
per-device shapes, and memory_analysis' argument bytes must be their bytes in the compiler's
tiles), and a closed-form bound on the FLOPs of a model forward.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

pytest.importorskip("libtpu", reason="the TPU compiler (libtpu) comes with the test extra")

from opdjax import sharding  # noqa: E402
from opdjax.aot import chips, hlo, job, report  # noqa: E402
from opdjax.models.presets import preset_config  # noqa: E402
from opdjax.train.config import opd_config  # noqa: E402

pytestmark = pytest.mark.timeout(600)
TOY = os.path.join(os.path.dirname(__file__), "..", "opdjax", "assets", "toy_pair")


def _mesh(topology="v5p:2x2x1", shape=(1, -1, 1)):
    _, devices = chips.abstract_devices(topology)
    return sharding.make_mesh(shape, devices=list(devices))


def _sds(mesh, shape, spec, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, PartitionSpec(*spec)))


# ----------------------------------------------------------------------------- the HLO walk
def test_topology_names():
    assert chips.topology_name(*chips.parse_topology("v5p-64")) == "v5p:2x4x4"  # 64 cores = 32 chips
    assert chips.topology_name(*chips.parse_topology("v5p-8")) == "v5p:2x2x1"
    assert chips.topology_name(*chips.parse_topology("v6e-8")) == "v6e:2x4"
    assert chips.topology_name(*chips.parse_topology("v4-32")) == "v4:2x2x4"
    assert chips.parse_topology("v5e:4x4")[0].hbm_bytes == 16 * 1024 ** 3
    for bad in ("", "v9x:2x2", "v5p", "v5p-12"):
        with pytest.raises(chips.TopologyError, match="compile.topology"):
            chips.parse_topology(bad)


def test_loop_free_flops_equal_xla():
    """Plain and batched (attention-like) matmuls: XLA counts exactly the multiply-adds here."""
    mesh = _mesh()
    cases = [
        (lambda a, b: a @ b, (_sds(mesh, (64, 256), ("fsdp", None)), _sds(mesh, (256, 384), (None, None)))),
        (lambda q, k: jnp.einsum("bkgtd,bksd->bkgts", q, k, preferred_element_type=jnp.float32),
         (_sds(mesh, (8, 2, 4, 96, 64), ("fsdp",)), _sds(mesh, (8, 2, 160, 64), ("fsdp",)))),
        (lambda p, v: jnp.einsum("bkgts,bksd->bkgtd", p, v, preferred_element_type=jnp.float32),
         (_sds(mesh, (8, 2, 4, 96, 160), ("fsdp",)), _sds(mesh, (8, 2, 160, 64), ("fsdp",)))),
    ]
    for fn, args in cases:
        compiled = jax.jit(fn).lower(*args).compile()
        cost = hlo.analyze(compiled.as_text())
        assert cost.flops == pytest.approx(compiled.cost_analysis()["flops"], rel=1e-6)
        assert cost.loops == []


def test_trip_counts_multiply_loop_bodies():
    mesh = _mesh()
    w = _sds(mesh, (6, 256, 256), (None, "fsdp", None))
    x = _sds(mesh, (64, 256), ("fsdp", None))
    one = 2 * 16 * 256 * 256  # one [16 rows per chip, 256] x [256, 256] matmul

    def scan(w, x):
        return jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), x, w)[0]

    def nested(w, x):
        return jax.lax.scan(lambda c, _: (scan(w, c), None), x, None, length=3)[0]

    def early_exit(w, x):  # a decode-style loop: at most 10 trips, fewer if the sum gets large
        cond = lambda c: (c[0] < 10) & (jnp.sum(c[1]) < 1e9)  # noqa: E731
        return jax.lax.while_loop(cond, lambda c: (c[0] + 1, jnp.tanh(c[1] @ w[0])), (0, x))[1]

    for fn, trips, matmuls in ((scan, [6], 6), (nested, [3, 6], 18), (early_exit, [10], 10)):
        cost = hlo.analyze(jax.jit(fn).lower(w, x).compile().as_text())
        assert [lp["trip"] for lp in cost.loops] == trips
        assert cost.unknown_loops == 0
        assert cost.flops == matmuls * one
        assert cost.flops_once == one  # what XLA's cost_analysis would say
        # the layer weights are all-gathered over fsdp once per trip
        assert cost.collectives["all-gather"]["bytes"] == matmuls * 256 * 256 * 2


def test_slices_inside_nested_fusions_count_as_slices():
    """The decode step's live-prefix attention (qwen._attend_live) reads blocks of the cache; the
    TPU compiler slices each block inside a fusion nested in the attention fusion, and the walk
    must count the blocks read (at most every block of the one layer: its loop's trip count is an
    upper bound), not the whole [L, B, K, S, hd] cache per block."""
    from opdjax.models import qwen
    from opdjax.models.config import ModelConfig
    mesh = _mesh()  # the arrays replicated: one chip's program
    cfg = ModelConfig("qwen3", vocab_size=64, hidden_size=256, intermediate_size=512, num_layers=4,
                      num_heads=8, num_kv_heads=4, head_dim=64)
    L, B, S = 4, 8, 8 * qwen.KV_BLOCK
    ks, vs = (_sds(mesh, (L, B, 4, S, 64), ()) for _ in range(2))
    q = _sds(mesh, (B, 1, 8, 64), ())
    valid = _sds(mesh, (B, S), (), jnp.bool_)
    fn = lambda q, ks, vs, valid, live: qwen._attend_live(q, ks, vs, 2, valid, live[None] - 1, live, cfg, None)  # noqa: E731
    compiled = jax.jit(fn).lower(q, ks, vs, valid, _sds(mesh, (), (), jnp.int32)).compile()
    cost = hlo.analyze(compiled.as_text())
    assert [lp["trip"] for lp in cost.loops] == [S // qwen.KV_BLOCK]
    one_layer = 2 * B * 4 * S * 64 * 2  # K and V of one layer, bf16
    assert cost.bytes <= 2 * one_layer  # the blocks (plus small things); whole caches per block: 16x more
    assert cost.bytes >= one_layer


def test_tiled_argument_bytes():
    text = ("entry_computation_layout={(f32[]{:T(128)}, bf16[300]{0:T(512)(128)(2,1)}, f32[3,5]{1,0:T(4,128)}, "
            "s32[2,3,5]{2,0,1:T(2,128)}, f32[1000]{0:T(1024)})->f32[]}")
    got = hlo.entry_parameters(text)
    assert [g[1] for g in got] == [(), (300,), (3, 5), (2, 3, 5), (1000,)]
    assert [g[2] for g in got] == [512, 1024, 2048, 3 * 2 * 128 * 4, 4096]


# ------------------------------------------------------------------------------ the job
def _toy_config(topology, mesh_shape, workdir, phases=()):
    c = opd_config()
    c.job = "compile"
    c.workdir = str(workdir)
    c.student.path, c.teacher.path = os.path.join(TOY, "student"), os.path.join(TOY, "teacher")
    c.mesh.shape = mesh_shape
    c.data.max_prompt_tokens = 48
    c.rollout.max_new_tokens = 64
    c.batch.prompts_per_step = 4
    c.rollout.samples_per_prompt = 4
    c.eval.num_problems = 16
    c.eval.max_new_tokens = 32
    c.compile.topology = topology
    c.compile.phases = phases
    return c


def _100m_config(topology, mesh_shape, workdir, phases=()):
    c = _toy_config(topology, mesh_shape, workdir, phases)
    c.student.path = c.teacher.path = ""
    c.compile.student, c.compile.teacher = "opdjax-100m", "opdjax-200m"
    c.teacher.dtype = "bfloat16"
    c.data.max_prompt_tokens = 64
    c.rollout.max_new_tokens = 128
    c.batch.prompts_per_step, c.rollout.samples_per_prompt = 4, 2
    return c


def _forward_flops_bounds(cfg, rows, tokens, devices):
    """Matmul FLOPs of one forward over rows x tokens, per device: the projections exactly, plus
    attention between none and all of the keys, plus the unembedding between none and all rows."""
    L, D, F, H, K, hd, V = (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads,
                            cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size)
    proj = 2 * rows * tokens * L * (D * (H + 2 * K) * hd + H * hd * D + 3 * D * F)
    attention = 2 * 2 * rows * L * H * hd * tokens * tokens
    unembed = 2 * rows * tokens * V * D
    return proj / devices, (proj + attention + unembed) / devices


CASES = [("toy", "v5p:2x2x1", (1, -1, 1), ()), ("toy", "v6e:2x4", (1, -1, 1), ()),
         ("toy", "v5p:2x2x1", (1, 2, 2), ("sample", "train step")), ("toy", "v6e:2x4", (1, -1, 2), ("sample", "train step")),
         # ~100M: every heavy phase on each topology, spread over the meshes (CI time)
         ("100m", "v5p:2x2x1", (1, -1, 1), ("sample", "teacher scoring", "train step")),
         ("100m", "v6e:2x4", (1, -1, 1), ("teacher scoring",)),
         ("100m", "v5p:2x2x1", (1, 2, 2), ("train step",)),
         ("100m", "v6e:2x4", (1, -1, 2), ("sample", "train step"))]
# (1, 2, 2) needs 4 chips; on the 8 chips of v6e:2x4 the tensor-parallel mesh is (1, 4, 2)


@pytest.mark.integration
@pytest.mark.parametrize("pair,topology,mesh_shape,phases", CASES,
                         ids=[f"{p}-{t}-{'x'.join(map(str, m))}" for p, t, m, _ in CASES])
def test_compile_job(tmp_path, pair, topology, mesh_shape, phases):
    config = (_toy_config if pair == "toy" else _100m_config)(topology, mesh_shape, tmp_path, phases)
    rep = job.run(config)
    names = [p["name"] for p in rep["phases"]]
    assert names == list(phases) if phases else names[:5] == [
        "sample", "teacher scoring", "release margins", "release decision", "train step"]
    chip = chips.parse_topology(topology)[0]
    for p in rep["phases"]:
        assert not p["error"] and p["fits"], p["name"]
        # the compiled program takes exactly our per-device argument shapes, and its argument
        # bytes are those arrays' bytes in the compiler's tiles: no replicated or extra copy
        assert p["argument_shapes_match"], p["name"]
        assert p["argument_bytes"] == p["expected_argument_bytes"], p["name"]
        assert 0 < p["total_bytes"] < chip.hbm_bytes
        assert p["roofline"]["time_s"] > 0
    by = {p["name"]: p for p in rep["phases"]}
    if "teacher scoring" in by and pair == "100m":
        teacher = preset_config("opdjax-200m")
        B = config.batch.prompts_per_step * config.rollout.samples_per_prompt
        T = config.data.max_prompt_tokens + config.rollout.max_new_tokens
        lo, hi = _forward_flops_bounds(teacher, B, T, rep["num_devices"])
        assert lo <= by["teacher scoring"]["flops"] <= hi  # loops applied: one layer counted once is ~1/24
        assert by["teacher scoring"]["loops"][0]["trip"] == teacher.num_layers
    if "train step" in by and config.batch.microbatches == 1:
        assert by["train step"]["alias_bytes"] > 0  # the state is donated
    with open(tmp_path / "compile" / "compile_report.json") as f:
        assert json.load(f)["topology"] == topology
    md = (tmp_path / "compile" / "compile_report.md").read_text()
    assert "roofline estimates" in md and "| sample |" in md or phases


def test_phase_that_cannot_fit_is_named(tmp_path):
    """Qwen3-8B as a float32 student with its AdamW state on one 16 GiB v5e chip: refused before
    compiling, naming the phase."""
    c = _100m_config("v5e:1x1", (1, -1, 1), tmp_path, ("train step",))
    c.compile.student, c.compile.teacher = "Qwen3-8B", "Qwen3-0.6B"
    c.batch.prompts_per_step, c.rollout.samples_per_prompt = 1, 1
    with pytest.raises(report.DoesNotFitError, match=r"phase 'train step' needs at least \d+\.\d+ GiB"):
        job.run(c)


def test_compiler_refusal_is_named(tmp_path):
    """Parameters that fit, activations that do not: the TPU compiler's own verdict, per phase."""
    c = _100m_config("v5e:1x1", (1, -1, 1), tmp_path, ("teacher scoring",))
    c.batch.prompts_per_step, c.rollout.samples_per_prompt = 64, 8
    c.data.max_prompt_tokens, c.rollout.max_new_tokens = 1024, 4096
    c.loss.chunk_tokens = 65536
    with pytest.raises(report.DoesNotFitError, match="phase 'teacher scoring'"):
        job.run(c)


def test_unknown_phase_and_missing_topology(tmp_path):
    from opdjax.models.config import ConfigError
    c = _toy_config("v5p:2x2x1", (1, -1, 1), tmp_path, ("decode",))
    with pytest.raises(ConfigError, match="compile.phases names"):
        job.run(c)
    c = _toy_config("", (1, -1, 1), tmp_path)
    with pytest.raises(ConfigError, match="compile.topology"):
        job.run(c)


def test_check_at_start_on_tpu(tmp_path, monkeypatch):
    """The OPD/DAIL jobs' start-up check: nothing on CPU; on TPU (here: the abstract devices of one
    v5e chip standing in for jax.devices()) a phase that cannot fit stops the job before weights."""
    c = _100m_config("", (1, -1, 1), tmp_path)
    c.compile.student, c.compile.teacher = "Qwen3-8B", "Qwen3-0.6B"
    job.check_at_start(c, None, "opd")  # CPU: returns without compiling anything
    _, devices = chips.abstract_devices("v5e:1x1")
    monkeypatch.setattr(job.jax, "devices", lambda *a: list(devices))
    plan = sharding.ShardingPlan(sharding.make_mesh((1, -1, 1), devices=list(devices)))
    with pytest.raises(report.DoesNotFitError, match="phase 'sample'"):
        job.check_at_start(c, plan, "opd")
    c.compile.check_at_start = False
    job.check_at_start(c, plan, "opd")
