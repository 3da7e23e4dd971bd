"""opdjax.models.lora against peft's LoRA on transformers' PyTorch Qwen (the independent oracle),
plus the identities the trainer relies on: b = 0 is the base, merge == apply with the adapter,
the adapter gradient is the chain rule through the merged weight, export and adapter files.
The adapter acts on the activations (y = x @ W + s (x @ a) @ b, as peft): test_logits_match_peft
checks that path against peft in float32; the tests at the end, that it keeps an update the
bfloat16 merge loses, its gradients' closed form, and that no weight-shaped array is made."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from hf_oracle import VOCAB, hf_logits, make_hf_model
from opdjax import sharding
from opdjax.dail.config import dail_config
from opdjax.models import hf_io, lora, qwen
from opdjax.models.config import ConfigError, ModelConfig
from opdjax.models.presets import preset_config

forward = jax.jit(qwen.forward, static_argnames=("cfg", "plan", "attn_chunk"))
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CASES = {
    # name: (model_type, make_hf_model kwargs, rank, alpha, targets)
    "qwen3_all_targets": ("qwen3", dict(heads=8, kv_heads=2, head_dim=24), 4, 12.0, HF_TARGETS),
    "qwen2_tied_bias_subset": ("qwen2", dict(heads=4, kv_heads=2, tied=True), 3, 3.0,
                               ["q_proj", "v_proj", "o_proj", "down_proj"]),
}


def toks(shape=(2, 24), seed=0):
    return np.random.RandomState(seed).randint(3, VOCAB, shape)


def small_cfg(**kw):
    base = dict(model_type="qwen3", vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_layers=2,
                num_heads=4, num_kv_heads=2, head_dim=16)
    return ModelConfig(**{**base, **kw})


CFG = small_cfg()
SPEC = lora.LoraSpec(4, 8.0)  # all projections; shared by the tests below so compilations are reused


def random_adapter(cfg, spec, seed=0, std=0.3, dtype=jnp.float32):
    shapes = lora.lora_shapes(cfg, spec)
    rng = np.random.RandomState(seed)
    return {t: {p: jnp.asarray(std * rng.randn(*s[p]) / np.sqrt(s[p][1]), dtype) for p in ("a", "b")}
            for t, s in shapes.items()}


def peft_model(model_type, kw, rank, alpha, targets, seed, base_dir):
    """A tiny HF model (saved to base_dir first) with a peft LoRA whose A and B are both random
    (B = 0 would test nothing)."""
    model = make_hf_model(model_type, **kw)
    model.save_pretrained(base_dir)
    pm = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets),
                                          lora_dropout=0.0, init_lora_weights=False))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen) / np.sqrt(p.shape[1]))
    return pm.eval()


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_match_peft(tmp_path, name):
    model_type, kw, rank, alpha, targets = CASES[name]
    pm = peft_model(model_type, kw, rank, alpha, targets, seed=1, base_dir=tmp_path / "base")
    with pm.disable_adapter():
        base_ref = hf_logits(pm, toks())
    params, cfg = hf_io.load_pretrained(str(tmp_path / "base"))

    # Our adapter from peft's modules, converted here by hand: a_l = A^T, b_l = B^T.
    spec = lora.LoraSpec(rank, alpha, tuple(targets))
    adapter = {}
    for t in spec.targets:
        module = lora.HF_MODULES[t]
        layers = pm.base_model.model.model.layers
        A = [dict(layers[i].named_modules())[module].lora_A["default"].weight.detach().numpy()
             for i in range(cfg.num_layers)]
        B = [dict(layers[i].named_modules())[module].lora_B["default"].weight.detach().numpy()
             for i in range(cfg.num_layers)]
        adapter[t] = {"a": jnp.asarray(np.stack([x.T for x in A])), "b": jnp.asarray(np.stack([x.T for x in B]))}
    lora.check_adapter(adapter, cfg, spec)

    t = toks()
    ref = hf_logits(pm, t)
    assert np.abs(ref - base_ref).max() > 0.05  # the adapter changes the model visibly
    ours, _ = forward(params, jnp.asarray(t), cfg, layer_transform=lora.layer_transform(adapter, spec.scale))
    assert np.abs(np.asarray(ours) - ref).max() <= 1e-4
    base, _ = forward(params, jnp.asarray(t), cfg)
    assert np.abs(np.asarray(base) - base_ref).max() <= 1e-4

    # peft's own adapter file reads as the same adapter; ours loads into peft with the same logits.
    pm.save_pretrained(tmp_path / "peft_adapter")
    loaded, loaded_spec = lora.load_adapter(str(tmp_path / "peft_adapter"), cfg)
    assert loaded_spec == spec
    jax.tree.map(np.testing.assert_array_equal, loaded, adapter)
    lora.save_adapter(adapter, spec, str(tmp_path / "ours"))
    theirs = PeftModel.from_pretrained(make_hf_model(model_type, **kw), str(tmp_path / "ours")).eval()
    assert np.abs(hf_logits(theirs, t) - np.asarray(ours)).max() <= 1e-4


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_zero_b_is_the_base_exactly(dtype):
    cfg = CFG if dtype == "float32" else small_cfg(dtype=dtype)
    params = jax.tree.map(lambda x: x.astype(dtype), qwen.init_params(CFG, jax.random.key(0), std=0.05))
    spec = SPEC
    adapter = lora.init_lora(cfg, spec, jax.random.key(1))
    assert all(float(jnp.abs(x["b"]).max()) == 0 for x in adapter.values())
    a = adapter["gate"]["a"]
    bound = 1 / np.sqrt(cfg.hidden_size)  # PEFT's kaiming-uniform default
    assert float(jnp.abs(a).max()) <= bound and float(jnp.abs(a).max()) > 0.8 * bound
    t = jnp.asarray(toks())
    base, _ = forward(params, t, cfg)
    adapted, _ = forward(params, t, cfg, layer_transform=lora.layer_transform(adapter, spec.scale))
    np.testing.assert_array_equal(np.asarray(base), np.asarray(adapted))
    # init is per target: adapting fewer projections draws the same a for those adapted
    fewer = lora.init_lora(cfg, lora.LoraSpec(4, 8.0, ("gate",)), jax.random.key(1))
    np.testing.assert_array_equal(fewer["gate"]["a"], a)


def test_merge_equals_apply_with_adapter_and_keeps_the_base():
    cfg, spec = CFG, SPEC
    params = qwen.init_params(cfg, jax.random.key(0), std=0.05)
    before = jax.tree.map(np.asarray, params)
    adapter = random_adapter(cfg, spec)
    t = jnp.asarray(toks())
    with_lora, _ = forward(params, t, cfg, layer_transform=lora.layer_transform(adapter, spec.scale))
    merged = lora.merge(params, adapter, spec)
    plain, _ = forward(merged, t, cfg)
    assert np.abs(np.asarray(plain) - np.asarray(with_lora)).max() <= 1e-6
    base, _ = forward(params, t, cfg)
    assert np.abs(np.asarray(base) - np.asarray(with_lora)).max() > 0.05
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, params))  # untouched
    subset = lora.LoraSpec(4, 8.0, ("q", "o", "up", "down"))
    partly = lora.merge(params, {t: adapter[t] for t in subset.targets}, subset)
    for name in ("k", "v", "gate"):  # not adapted: the very same arrays
        assert partly["layers"][name] is params["layers"][name]
    np.testing.assert_array_equal(partly["layers"]["up"], merged["layers"]["up"])
    w = np.asarray(params["layers"]["o"][1]).reshape(-1, cfg.hidden_size)  # [H*hd, D]
    delta = np.asarray(adapter["o"]["a"][1]) @ np.asarray(adapter["o"]["b"][1]) * spec.scale
    np.testing.assert_allclose(np.asarray(merged["layers"]["o"][1]).reshape(w.shape), w + delta, atol=1e-6)


def test_adapter_gradient_is_the_chain_rule_through_the_merged_weight():
    cfg, spec = CFG, SPEC
    params = qwen.init_params(cfg, jax.random.key(0), std=0.05)
    adapter = random_adapter(cfg, spec, seed=3)
    t = jnp.asarray(toks((2, 12)))

    def loss_lora(adapter):  # remat: as the trainer runs it
        hidden, _ = qwen.apply(params, t, cfg, layer_transform=lora.layer_transform(adapter, spec.scale),
                               remat=True)
        return jnp.mean(qwen.logits_from_hidden(params, hidden) ** 2)

    def loss_full(layers):
        hidden, _ = qwen.apply({**params, "layers": layers}, t, cfg)
        return jnp.mean(qwen.logits_from_hidden(params, hidden) ** 2)

    grad_lora = jax.jit(jax.grad(loss_lora))
    grads = grad_lora(adapter)
    # Only the adapter is differentiated: the gradient has the adapter's structure, nothing else.
    assert jax.tree.structure(grads) == jax.tree.structure(adapter)
    g_w = jax.jit(jax.grad(loss_full))(lora.merge(params, adapter, spec)["layers"])
    for name in spec.targets:
        a, b = np.asarray(adapter[name]["a"]), np.asarray(adapter[name]["b"])
        gw = np.asarray(g_w[name]).reshape(a.shape[0], a.shape[1], b.shape[2])  # [L, in, out]
        want_a = spec.scale * gw @ b.transpose(0, 2, 1)
        want_b = spec.scale * a.transpose(0, 2, 1) @ gw
        for got, want in ((grads[name]["a"], want_a), (grads[name]["b"], want_b)):
            assert np.abs(want).max() > 0
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    # At init (b = 0) only b gets a gradient, as in any LoRA.
    g0 = grad_lora(lora.init_lora(cfg, spec, jax.random.key(2)))
    assert float(jnp.abs(g0["q"]["a"]).max()) == 0 and float(jnp.abs(g0["q"]["b"]).max()) > 0


def test_export_merged_round_trip(tmp_path):
    cfg, spec = CFG, SPEC
    params = qwen.init_params(cfg, jax.random.key(0), std=0.05)
    adapter = random_adapter(cfg, spec, seed=5)
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    (tok_dir / "tokenizer.json").write_text("{}")
    lora.export_merged(params, adapter, spec, cfg, str(tmp_path / "out"), str(tok_dir))
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    again, cfg2 = hf_io.load_pretrained(str(tmp_path / "out"))
    assert cfg2 == cfg
    t = jnp.asarray(toks())
    want, _ = forward(params, t, cfg, layer_transform=lora.layer_transform(adapter, spec.scale))
    got, _ = forward(again, t, cfg2)
    assert np.abs(np.asarray(got) - np.asarray(want)).max() <= 1e-5


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_adapter_file_round_trip(tmp_path, dtype):
    cfg = CFG
    spec = lora.LoraSpec(5, 10.0, ("k", "o", "gate"))
    adapter = random_adapter(cfg, spec, dtype=dtype)
    lora.save_adapter(adapter, spec, str(tmp_path / "ad"), base_model_name_or_path="Qwen/Qwen3-8B")
    assert sorted(os.listdir(tmp_path / "ad")) == ["adapter_config.json", "adapter_model.safetensors"]
    conf = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert (conf["r"], conf["lora_alpha"], conf["target_modules"]) == (5, 10.0, ["k_proj", "o_proj", "gate_proj"])
    loaded, spec2 = lora.load_adapter(str(tmp_path / "ad"), cfg)
    assert spec2 == spec
    assert jax.tree.structure(loaded) == jax.tree.structure(adapter)
    for x, y in zip(jax.tree.leaves(loaded), jax.tree.leaves(adapter)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))
    with pytest.raises(ValueError, match=r"k\.a has shape"):
        lora.load_adapter(str(tmp_path / "ad"), small_cfg(hidden_size=64))
    conf["use_rslora"] = True
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(conf))
    with pytest.raises(ValueError, match="use_rslora"):
        lora.load_adapter(str(tmp_path / "ad"))
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        lora.load_adapter(str(tmp_path))


def test_spec_from_config_and_errors():
    c = dail_config()
    spec = lora.LoraSpec.from_config(c.lora)
    assert spec == lora.LoraSpec(32, 32.0, lora.PROJECTIONS) and spec.scale == 1.0
    c.lora.enabled = False
    assert lora.LoraSpec.from_config(c.lora) is None
    c.lora.enabled = True
    c.lora.targets = ("down_proj", "q")  # transformers names too; stored in canonical order
    assert lora.LoraSpec.from_config(c.lora).targets == ("q", "down")
    bad = [
        (dict(targets=("q", "qproj")), r"config\.lora\.targets: 'qproj' is not a projection; choose from q, k, v"),
        (dict(targets=()), r"config\.lora\.targets is empty"),
        (dict(targets=("q", "q_proj")), r"config\.lora\.targets names 'q' twice"),
        (dict(rank=0), r"config\.lora\.rank=0: .* >= 1"),
        (dict(rank=2.5), r"config\.lora\.rank=2\.5"),
        (dict(alpha=0.0), r"config\.lora\.alpha=0\.0: .* > 0"),
        (dict(alpha=-4.0), r"config\.lora\.alpha=-4\.0"),
    ]
    for override, message in bad:
        section = {**dail_config().lora.to_dict(), **override}
        with pytest.raises(ConfigError, match=message):
            lora.LoraSpec.from_config(section)
    with pytest.raises(ConfigError, match=r"LoraSpec\.rank=0"):
        lora.LoraSpec(0, 1.0)


def test_shapes_axes_and_counts():
    cfg = preset_config("Qwen3-8B")
    spec = lora.LoraSpec(32, 32.0)
    shapes = lora.lora_shapes(cfg, spec)
    assert shapes["q"] == {"a": (36, 4096, 32), "b": (36, 32, 4096)}
    assert shapes["k"]["b"] == (36, 32, 1024) and shapes["o"]["a"] == (36, 4096, 32)
    assert shapes["down"] == {"a": (36, 12288, 32), "b": (36, 32, 4096)}
    assert lora.num_lora_params(cfg, spec) == 87_293_952  # what peft reports for Qwen3-8B, r=32
    axes = lora.lora_axes(cfg, spec)
    assert axes["q"] == {"a": ("layers", "embed", None), "b": ("layers", None, "heads")}
    assert axes["o"] == {"a": ("layers", "heads", None), "b": ("layers", None, "embed")}
    assert axes["down"] == {"a": ("layers", "mlp", None), "b": ("layers", None, "embed")}


def test_sharded_forward_matches_single_device():
    cfg, spec = CFG, SPEC
    plan = sharding.ShardingPlan(sharding.make_mesh((1, 2, 4)))
    params = qwen.init_params(cfg, jax.random.key(0), std=0.05)
    adapter = random_adapter(cfg, spec)
    shardings = lora.lora_shardings(cfg, spec, plan)
    assert shardings["q"]["b"].spec == jax.sharding.PartitionSpec(None, None, "tensor")
    assert shardings["gate"]["a"].spec == jax.sharding.PartitionSpec(None, "fsdp", None)
    s_params = jax.device_put(params, qwen.param_shardings(cfg, plan))
    s_adapter = jax.device_put(adapter, shardings)
    t = jnp.asarray(toks())
    want, _ = forward(params, t, cfg, layer_transform=lora.layer_transform(adapter, spec.scale))
    got, _ = forward(s_params, t, cfg, plan=plan,
                     layer_transform=lora.layer_transform(s_adapter, spec.scale, plan))
    assert np.abs(np.asarray(got) - np.asarray(want)).max() <= 1e-5
    merged = lora.merge(s_params, s_adapter, spec)
    assert merged["layers"]["q"].sharding == s_params["layers"]["q"].sharding


# ------------------------------------------------------------------ the activation path (issue 15, item 8)
@dataclasses.dataclass(frozen=True)
class _MergeHook:
    """The former training path, kept for comparison: each layer runs with W + s * a @ b merged
    into its weights (lora.merge_layer) inside the layer scan."""

    def __call__(self, lp, layer_adapter, scale):
        return lora.merge_layer(lp, layer_adapter, scale)


def _aligned_update(rng, x_sign, n_out, r, max_abs, s):
    """a [in, r], b [r, out] with max |s a @ b| = max_abs and a's columns aligned with the input
    signs, as a trained adapter's are (its gradient x^T (...) points along the inputs it saw);
    b's rows agree in sign per output, so every entry of s a @ b is within 4x of max_abs."""
    a = x_sign[:, None] * rng.uniform(0.5, 1.0, (x_sign.size, r))
    b = rng.choice([-1.0, 1.0], n_out) * rng.uniform(0.5, 1.0, (r, n_out))
    b *= max_abs / np.abs(s * a @ b).max()
    return a.astype(np.float32), b.astype(np.float32)


def test_a_1e6_update_stays_visible_with_bf16_weights_where_the_merge_loses_it():
    """bfloat16 W (|W| >= 0.02), an update s a @ b at most 1e-6 x min |W| (1/2000 of half a bf16
    ulp of any W entry, which is >= 2^-9 |W|): merged into W and rounded to bf16 it is gone, bit
    for bit; the activation path (float32 activations here, so the output keeps it) adds
    s (x @ a) @ b to the float32 accumulator, and output - base equals the float64 closed form
    within its float32 bound."""
    rng = np.random.RandomState(0)
    n_in, n_out, r, s = 64, 48, 4, 2.0
    w = rng.choice([-1.0, 1.0], (n_in, n_out)) * rng.uniform(0.02, 0.1, (n_in, n_out))
    w_bf = jnp.asarray(w, jnp.bfloat16)
    w32 = np.asarray(w_bf, np.float64)
    x_sign = rng.choice([-1.0, 1.0], n_in)
    x = (x_sign * rng.uniform(0.5, 1.5, (2, 5, n_in))).astype(np.float32)
    a, b = _aligned_update(rng, x_sign, n_out, r, 1e-6 * np.abs(w32).min(), s)
    update = s * a.astype(np.float64) @ b.astype(np.float64)
    assert 0.24e-6 * np.abs(w32).min() <= np.abs(update).min() and np.abs(update).max() <= 1.001e-6 * np.abs(w32).min()
    layer_adapter = {"gate": {"a": jnp.asarray(a), "b": jnp.asarray(b)}}

    # the merge: W + s a b rounded to bf16 is W itself, so its output is the base output exactly
    merged_w = lora.merge_layer({"gate": w_bf}, layer_adapter, s)["gate"]
    np.testing.assert_array_equal(np.asarray(merged_w, np.float32), np.asarray(w_bf, np.float32))
    eq = "btd,df->btf"
    base = np.asarray(qwen._proj("gate", eq, jnp.asarray(x), w_bf), np.float64)
    np.testing.assert_array_equal(np.asarray(qwen._proj("gate", eq, jnp.asarray(x), merged_w), np.float64), base)

    # the activation path: the same accumulator x @ W (same op, same inputs: op by op, not fused
    # differently) plus the float32 term, one rounding
    delta = lambda name, h: lora.adapter_delta(name, h, layer_adapter, s)  # noqa: E731
    act = np.asarray(qwen._proj("gate", eq, jnp.asarray(x), w_bf, delta), np.float64)
    want = x.astype(np.float64) @ update  # closed form
    # bound: half a float32 ulp of the output (the add's rounding; act - base is then exact) plus
    # the float32 term's own error, gamma_k * s |x| |a| |b| with k = in + r + 1 sequential ops
    u = 2.0 ** -24
    term_err = (n_in + r + 2) * u * s * (np.abs(x) @ np.abs(a).astype(np.float64) @ np.abs(b).astype(np.float64))
    bound = 0.5 * np.spacing(np.abs(act).astype(np.float32)).astype(np.float64) + term_err
    assert np.all(np.abs((act - base) - want) <= bound)
    assert np.all(np.abs(want) > 4 * bound)  # visible: every output moved, by > 4x its error bound (~11x)
    assert np.all(act != base)


def _sub_ulp_adapter(params, spec, cfg, seed):
    """Adapted weights pushed to |W| >= 0.02 (bf16) and an adapter with max |s a_l b_l| =
    2^-11 min |W| per target: under half a bf16 ulp (>= 2^-9 |W|) of every entry, so the merge
    rounds every adapted weight back to itself."""
    rng = np.random.RandomState(seed)
    layers = dict(params["layers"])
    adapter = {}
    for t, shp in lora.lora_shapes(cfg, spec).items():
        w = np.asarray(layers[t], np.float32)
        w = np.where(w < 0, -1.0, 1.0) * (np.abs(w) + 0.02)
        layers[t] = jnp.asarray(w, jnp.bfloat16)
        a = rng.randn(*shp["a"]) / np.sqrt(shp["a"][1])
        b = rng.randn(*shp["b"])
        b *= 2.0 ** -11 * np.abs(np.asarray(layers[t], np.float32)).min() / np.abs(spec.scale * a @ b).max()
        adapter[t] = {"a": jnp.asarray(a, jnp.float32), "b": jnp.asarray(b, jnp.float32)}
    return {**params, "layers": layers}, adapter


def test_bf16_model_merge_drops_a_sub_half_ulp_adapter_the_activation_path_does_not():
    cfg, spec = small_cfg(dtype="bfloat16"), SPEC
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), qwen.init_params(cfg, jax.random.key(0), std=0.05))
    params, adapter = _sub_ulp_adapter(params, spec, cfg, seed=4)
    t = jnp.asarray(toks())
    base, _ = forward(params, t, cfg)
    merged = lora.merge(params, adapter, spec)
    for name in spec.targets:  # every adapted weight rounds back to itself
        np.testing.assert_array_equal(np.asarray(merged["layers"][name], np.float32),
                                      np.asarray(params["layers"][name], np.float32))
    np.testing.assert_array_equal(np.asarray(forward(merged, t, cfg)[0]), np.asarray(base))
    in_scan, _ = forward(params, t, cfg, layer_transform=qwen.LayerTransform(_MergeHook(), adapter, spec.scale))
    np.testing.assert_array_equal(np.asarray(in_scan), np.asarray(base))  # the former training path: lost too
    act, _ = forward(params, t, cfg, layer_transform=lora.layer_transform(adapter, spec.scale))
    moved = np.asarray(act) != np.asarray(base)
    assert moved.mean() > 0.5, moved.mean()  # the update reaches the logits


@pytest.mark.parametrize("target,eq,x_shape", [("q", "btd,dhk->bthk", (2, 3, 12)),
                                               ("o", "bthk,hkd->btd", (2, 3, 4, 5))])
def test_activation_path_gradients_are_the_closed_form(target, eq, x_shape):
    """L = sum(c * y), y = x @ W + s (x @ a) @ b (in = x's trailing dims flattened; q: out = H*hd):
    dL/da = s x^T (c b^T), dL/db = s (x a)^T c, in float64 against jax.grad in float32."""
    rng = np.random.RandomState(1)
    w = rng.randn(12, 4, 5) if target == "q" else rng.randn(4, 5, 12)
    n_in = int(np.prod(x_shape[2:]))
    n_out = w.size // n_in
    r, s = 3, 1.5
    x = rng.randn(*x_shape)
    a, b = rng.randn(n_in, r) / np.sqrt(n_in), rng.randn(r, n_out) / np.sqrt(r)
    c = rng.randn(2, 3, n_out)
    f32 = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731

    def loss(ab):
        delta = lambda name, h: lora.adapter_delta(name, h, {target: ab}, s)  # noqa: E731
        y = qwen._proj(target, eq, f32(x), f32(w), delta)
        return jnp.sum(f32(c) * y.reshape(2, 3, n_out))

    g = jax.grad(loss)({"a": f32(a), "b": f32(b)})
    xf = x.reshape(6, n_in)
    cf = c.reshape(6, n_out)
    want_a, want_b = s * xf.T @ (cf @ b.T), s * (xf @ a).T @ cf
    # gamma_k bounds of the two nested float32 products (k = both reduction lengths + the scale)
    u = 2.0 ** -24
    bound_a = (6 + n_out + 2) * u * s * np.abs(xf).T @ (np.abs(cf) @ np.abs(b).T)
    bound_b = (6 + n_in + 2) * u * s * (np.abs(xf) @ np.abs(a)).T @ np.abs(cf)
    assert np.all(np.abs(np.asarray(g["a"], np.float64) - want_a) <= bound_a)
    assert np.all(np.abs(np.asarray(g["b"], np.float64) - want_b) <= bound_b)


def _eqn_shapes(jaxpr, out=None):
    """Shapes of every equation output in a jaxpr and all its sub-jaxprs (scan, remat, pjit, ...)."""
    out = set() if out is None else out
    for eqn in jaxpr.eqns:
        out.update(tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (list, tuple)) else [p]):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    _eqn_shapes(inner, out)
    return out


def test_training_gradient_makes_no_weight_shaped_array():
    """The adapter's backward pass (as the trainer runs it: remat) builds only adapter-, activation-
    and smaller shapes: no per-layer weight or weight-shaped gradient, flattened or not, unlike the
    merge (which the same walk finds, so the walk sees them)."""
    cfg, spec = CFG, SPEC
    params = qwen.init_params(cfg, jax.random.key(0), std=0.05)
    adapter = random_adapter(cfg, spec, seed=3)
    t = jnp.asarray(toks((2, 12)))
    weight_shapes = set()
    for name, shp in qwen.param_shapes(cfg)["layers"].items():
        if name in lora.IN_DIMS:
            n = lora.IN_DIMS[name]
            weight_shapes |= {tuple(shp[1:]), (int(np.prod(shp[1:1 + n])), int(np.prod(shp[1 + n:])))}

    def grad_shapes(transform):
        def loss(ad):
            hidden, _ = qwen.apply(params, t, cfg, layer_transform=transform(ad), remat=True)
            return jnp.mean(qwen.logits_from_hidden(params, hidden) ** 2)
        return _eqn_shapes(jax.make_jaxpr(jax.grad(loss))(adapter).jaxpr)

    assert not grad_shapes(lambda ad: lora.layer_transform(ad, spec.scale)) & weight_shapes
    assert grad_shapes(lambda ad: qwen.LayerTransform(_MergeHook(), ad, spec.scale)) & weight_shapes
