"""One process of the 2-process CPU job in test_multihost.py (a script, not a test module).

    python multihost_worker.py PROCESS_ID PORT WORKDIR

The parent sets XLA_FLAGS (4 CPU devices per process, collective terminate timeout) and
JAX_PLATFORMS=cpu. WORKDIR holds `hf/` (a tiny transformers checkpoint) and `ref.npz` (tokens,
mask, the checkpoint's tensors in our layout, reference logits). This process joins the job
with `jax.distributed.initialize`, and for two (2,2,2) meshes over the 8 global devices loads
the checkpoint straight into its shardings, checks its addressable shards, runs the sharded
forward, gathers the logits and checks them; then takes part in `save_pretrained` to
WORKDIR/out (process 0 writes) and saves the gathered logits to WORKDIR/logits{ID}.npy.
Any failed check exits non-zero with the reason on stderr.
"""
import os
import sys
import time

T0 = time.perf_counter()
TOL = 1e-4


def say(msg: str) -> None:
    print(f"[worker {sys.argv[1]} {time.perf_counter() - T0:6.2f}s] {msg}", file=sys.stderr, flush=True)


def main(process_id: int, port: int, workdir: str) -> None:
    import jax

    # gloo is jax 0.10's default for cross-process CPU collectives; set it anyway so the test
    # does not depend on the default (with no implementation, a computation spanning
    # processes cannot run on CPU).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
    _gloo_on_loopback()
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        coordinator_bind_address=f"127.0.0.1:{port}",  # jax's default is [::]:PORT, all interfaces
        num_processes=2,
        process_id=process_id,
        initialization_timeout=30,
        heartbeat_timeout_seconds=10,
        shutdown_timeout_seconds=30,
    )
    import numpy as np
    from jax.experimental import multihost_utils

    from opdjax import multihost, sharding
    from opdjax.models import hf_io

    assert jax.process_count() == 2 and jax.process_index() == process_id
    assert jax.local_device_count() == 4 and jax.device_count() == 8, jax.devices()
    # the CPU backend now exists, and made its gloo collectives through on_loopback
    assert GLOO_HOSTNAMES == ["127.0.0.1"], "jax made its CPU collectives some other way"
    assert sharding.maybe_initialize_distributed()  # opdjax sees the job it is in
    say(f"joined: process {jax.process_index()} of {jax.process_count()}, {jax.local_device_count()} "
        f"local / {jax.device_count()} global devices; jax {jax.__version__}, "
        f"opdjax from {os.path.dirname(sharding.__file__)}")

    ref = dict(np.load(os.path.join(workdir, "ref.npz")))
    by_process = [[d for d in jax.devices() if d.process_index == p] for p in (0, 1)]
    # Two layouts of the 8 devices: make_mesh's own (what a real job uses), and one whose tensor
    # axis pairs a device of process 0 with one of process 1, so every tensor-parallel
    # contraction in the forward all-reduces across the processes (gloo over TCP).
    interleaved = [d for pair in zip(*by_process) for d in pair]
    for layout, devices in (("default", None), ("tensor-across-processes", interleaved)):
        mesh = sharding.make_mesh((2, 2, 2), devices=devices)
        assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}, mesh.shape
        procs = np.vectorize(lambda d: d.process_index)(mesh.devices)
        crossing = [a for i, a in enumerate(sharding.MESH_AXES)
                    if (procs.min(axis=i) != procs.max(axis=i)).any()]
        assert crossing, procs  # the mesh spans both processes
        if devices is not None:
            assert crossing == ["tensor"], crossing
        what = f"{layout} mesh (across processes: {','.join(crossing)})"
        params, cfg, logits = check_layout(sharding.ShardingPlan(mesh), workdir, ref, what)

    np.save(os.path.join(workdir, f"logits{process_id}.npy"), logits)
    # Export from the last layout: both processes gather (collectives), only process 0 writes.
    hf_io.save_pretrained(params, cfg, os.path.join(workdir, "out"))
    # Process 1 returns from save_pretrained before process 0 has written: wait for it, so that
    # a clean exit of both means the checkpoint is complete.
    multihost_utils.sync_global_devices("opdjax test: checkpoint written")
    say("save_pretrained done; ok")


def check_layout(plan, workdir, ref, what):
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from opdjax import multihost, sharding
    from opdjax.models import hf_io, qwen

    # --- load straight into the shardings; every addressable shard is its checkpoint slice
    params, cfg = hf_io.load_pretrained(os.path.join(workdir, "hf"), plan=plan)
    axes = qwen.param_axes(cfg)
    local = set(jax.local_devices())
    leaves = jax.tree_util.tree_leaves_with_path(params)
    assert len(leaves) == sum(k.startswith("param/") for k in ref), [k for k in ref]
    split = 0
    for path, leaf in leaves:
        key = "/".join(p.key for p in path)
        full = ref["param/" + key]
        assert leaf.shape == full.shape and leaf.dtype == full.dtype, (key, leaf.shape, full.shape)
        assert not leaf.is_fully_addressable, key  # one global array over both processes
        want = plan.sharding(_get(axes, path), full.shape)
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (key, leaf.sharding, want)
        shards = leaf.addressable_shards
        assert {s.device for s in shards} == local, key
        for s in shards:
            np.testing.assert_array_equal(np.asarray(s.data), full[s.index], err_msg=f"{key} {s.index}")
        split += any(s.data.shape != full.shape for s in shards)
    emb = params["embed"]  # [V, D] -> (tensor, fsdp): a quarter per device
    assert emb.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp"), emb.sharding.spec
    assert emb.addressable_shards[0].data.shape == (cfg.vocab_size // 2, cfg.hidden_size // 2)
    assert split >= len(leaves) // 2, f"only {split} of {len(leaves)} params are split"

    # --- sharded forward on a batch every process holds in full; gather; compare
    tokens = multihost.to_global(plan, ref["tokens"], ("batch", "length"))
    mask = multihost.to_global(plan, ref["mask"], ("batch", "length"))
    assert not tokens.is_fully_addressable and len(tokens.addressable_shards) == 4
    logits = qwen.jit_forward(cfg, plan)(params, tokens, mask)
    assert logits.shape == ref["hf_logits"].shape and not logits.is_fully_addressable
    full = np.asarray(multihost_utils.process_allgather(logits, tiled=True))  # blocks
    m = ref["mask"]
    err_hf = float(np.abs(full[m] - ref["hf_logits"][m]).max())
    err_single = float(np.abs(full[m] - ref["single_logits"][m]).max())
    say(f"{what}: {len(leaves)} params loaded ({split} split), shards match the checkpoint; "
        f"logits vs transformers {err_hf:.1e}, vs single-process {err_single:.1e}")
    assert err_hf <= TOL and err_single <= TOL, (what, err_hf, err_single)
    return params, cfg, full


def _get(tree, path):
    for p in path:
        tree = tree[p.key]
    return tree


def _gloo_on_loopback() -> None:
    """Make gloo's TCP pairs listen on 127.0.0.1, not on whatever the host name resolves to.

    jax builds the gloo collectives in its CPU backend factory with no hostname, and gloo then
    binds to the address of gethostname(). Pinning it keeps the test on loopback and working on
    hosts whose name does not resolve.
    """
    from jax._src.lib import _jax

    make = _jax.make_gloo_tcp_collectives

    def on_loopback(distributed_client, **_):
        GLOO_HOSTNAMES.append("127.0.0.1")
        return make(distributed_client=distributed_client, hostname="127.0.0.1")

    _jax.make_gloo_tcp_collectives = on_loopback


GLOO_HOSTNAMES: list[str] = []


if __name__ == "__main__":
    try:
        main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
    except BaseException:
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)  # skip jax's atexit shutdown barrier: the peer may be gone or stuck
