"""The OPD loop end to end on tiny random checkpoints: it trains, logs, draws, checkpoints,
resumes exactly after SIGKILL, saves cleanly on SIGTERM, and rejects bad configs by name."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opdjax.models import hf_io
from opdjax.toy.checkpoints import build_random_checkpoint
from opdjax.train import opd
from opdjax.train.config import opd_config
from opdjax.train.metrics import read_metrics
from opdjax.train.validate import ConfigError, validate_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("pair")
    teacher = build_random_checkpoint(str(d / "teacher"), hidden_size=64, num_layers=2, seed=1)
    student = build_random_checkpoint(str(d / "student"), hidden_size=32, num_layers=1, num_heads=2,
                                      num_kv_heads=1, intermediate_size=64, seed=2)
    return teacher, student


def tiny_config(pair, workdir, **over):
    c = opd_config()
    c.workdir = str(workdir)
    c.teacher.path, c.student.path = pair
    c.data.task = "toy_arithmetic"
    c.data.num_train = 32
    c.data.num_eval = 4
    c.rollout.samples_per_prompt = 2
    c.rollout.max_new_tokens = 12
    c.batch.prompts_per_step = 4  # 8 rollout rows: divisible by the 8 simulated devices
    c.release.top_k = 4
    c.optimizer.learning_rate = 1e-3
    c.train.steps = 3
    c.eval.num_problems = 4
    c.eval.samples = 2
    c.eval.k = (1, 2)
    c.eval.max_new_tokens = 8
    c.checkpoint.every = 1
    c.checkpoint.async_save = False
    c.metrics.pictures_every = 2
    c.metrics.tensorboard = True
    c.metrics.progress = False
    for k, v in over.items():
        section, name = k.split(".")
        c[section][name] = v
    return c


@pytest.mark.integration
def test_opd_few_steps_end_to_end(pair, tmp_path):
    # 8 simulated devices; the permutation calibration runs inside the sharded training loop
    c = tiny_config(pair, tmp_path, **{"mesh.shape": (2, 2, 2), "release.calibration": "permutation",
                                       "release.permutations": 39})
    before, _ = hf_io.load_pretrained(pair[1])
    s = opd.run(c)
    assert s["final_step"] == 3 and not s["preempted"]
    recs = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss/total" in r]
    assert [r["step"] for r in recs] == [1, 2, 3]
    for r in recs:
        assert np.isfinite(r["loss/total"]) and r["loss/update_finite"] == 1.0
        for k in ("release/release_rate", "release/kept_share", "release/shuffled_release_rate",
                  "teacher/advantage_mean", "timing/sample_s", "timing/score_s", "timing/release_s",
                  "timing/update_s", "perf/rollout_tokens_per_s", "release/bic_release_rate",
                  "release/bic_chance_rate"):
            assert k in r, k
    assert "eval/greedy_accuracy" in s["eval_before"] and "eval/pass@2" in s["eval_after"]
    changed = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b)))),
                           s["final_params"], before)
    assert max(jax.tree.leaves(changed)) > 1e-6  # the student moved
    after, _ = hf_io.load_pretrained(os.path.join(tmp_path, "student_hf"))  # the exported HF student
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(s["final_params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert os.listdir(tmp_path / "pictures")  # release-rule pictures at step 2
    assert os.listdir(tmp_path / "tb")


def _launch(config, tmp_path, name):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config.to_dict()))
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")  # one device in the subprocess
    log = open(tmp_path / f"{name}.log", "w")
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "opd_worker.py"), str(path)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _wait_for_step(workdir, step, proc, timeout=200):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if os.path.exists(os.path.join(workdir, "metrics.jsonl")):
            if any(r.get("step", 0) >= step and "loss/total" in r for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))):
                return
        assert proc.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.2)
    raise TimeoutError(step)


def _losses(workdir):
    return {r["step"]: r["loss/total"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if "loss/total" in r}


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_exact_resume_after_sigkill(pair, tmp_path):
    over = {"train.steps": 6, "eval.num_problems": 0, "metrics.pictures_every": 0, "checkpoint.every": 2,
            "checkpoint.async_save": True}
    ref_dir, cut_dir = tmp_path / "uninterrupted", tmp_path / "interrupted"
    ref = _launch(tiny_config(pair, ref_dir, **over), tmp_path, "ref")
    assert ref.wait(300) == 0, (tmp_path / "ref.log").read_text()[-3000:]

    cut = _launch(tiny_config(pair, cut_dir, **over), tmp_path, "cut")
    _wait_for_step(cut_dir, 3, cut)
    cut.send_signal(signal.SIGKILL)  # no chance to save: resume from the last complete checkpoint
    cut.wait()
    resumed = _launch(tiny_config(pair, cut_dir, **over), tmp_path, "resumed")
    assert resumed.wait(300) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    assert "resumed from" in (tmp_path / "resumed.log").read_text()

    a, b = _losses(ref_dir), _losses(cut_dir)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]  # no duplicated or missing steps
    np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=0, atol=1e-6)
    pa, _ = hf_io.load_pretrained(str(ref_dir / "student_hf"))
    pb, _ = hf_io.load_pretrained(str(cut_dir / "student_hf"))
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-6)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_sigterm_saves_a_complete_checkpoint(pair, tmp_path):
    from opdjax.train.checkpoint import Checkpointer
    over = {"train.steps": 500, "eval.num_problems": 0, "metrics.pictures_every": 0, "checkpoint.every": 0,
            "checkpoint.async_save": True}
    proc = _launch(tiny_config(pair, tmp_path / "run", **over), tmp_path, "term")
    _wait_for_step(tmp_path / "run", 2, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 0, (tmp_path / "term.log").read_text()[-3000:]
    assert "DONE preempted=True" in (tmp_path / "term.log").read_text()
    ck = Checkpointer(str(tmp_path / "run" / "checkpoints"), keep=3, async_save=False)
    last = ck.latest_step()
    assert last is not None and last >= 2
    assert max(_losses(tmp_path / "run")) == last  # the checkpoint holds the last finished step
    ck.close()


# ------------------------------------------------------------------------------ bad configs
def _expect(c, match, **kw):
    with pytest.raises((ConfigError, ValueError), match=match):
        validate_config(c, **kw)


def test_bad_configs_are_named(pair, tmp_path):
    ok = tiny_config(pair, tmp_path)
    validate_config(ok)  # the baseline passes

    c = tiny_config(pair, tmp_path, **{"loss.name": "kl2"})
    _expect(c, r"config\.loss\.name='kl2'.*reverse_kl_topk")
    c = tiny_config(pair, tmp_path, **{"release.top_k": 100000})
    _expect(c, r"release\.top_k=100000 exceeds the vocabulary size 512")
    c = tiny_config(pair, tmp_path, **{"mesh.shape": (3, 1, 1)})
    _expect(c, r"config\.mesh\.shape=\(3, 1, 1\).*needs 3 devices but 8")
    c = tiny_config(pair, tmp_path, **{"batch.prompts_per_step": 3})
    _expect(c, r"config\.batch: 6 rollout rows.*divisible by batch\.microbatches=1 x batch shards 8")
    c = tiny_config(pair, tmp_path, **{"eval.k": (1, 4)})
    _expect(c, r"config\.eval\.k contains 4")
    c = tiny_config(pair, tmp_path)
    c.student.path = str(tmp_path / "nowhere")
    _expect(c, r"config\.student\.path=.*nowhere.*has no config\.json")
    c = tiny_config(pair, tmp_path, **{"data.task": "", "data.train_file": str(tmp_path / "missing.jsonl")})
    _expect(c, r"config\.data\.train_file=.*missing\.jsonl.*does not exist")
    c = tiny_config(pair, tmp_path, **{"rollout.old_logp": "logits"})
    _expect(c, r"config\.rollout\.old_logp='logits'")
    # the policy the loss trains must have a density and a finite loss (train/step.py)
    c = tiny_config(pair, tmp_path, **{"rollout.temperature": 0.0})
    _expect(c, r"config\.rollout\.temperature=0 \(greedy\) with config\.rollout\.old_logp='sampled'.*old_logp='model'")
    validate_config(tiny_config(pair, tmp_path, **{"rollout.temperature": 0.0, "rollout.old_logp": "model"}))
    c = tiny_config(pair, tmp_path, **{"rollout.top_p": 0.9, "loss.name": "forward_kl_full"})
    _expect(c, r"config\.loss\.name='forward_kl_full' under config\.rollout\.top_k=0 / top_p=0\.9.*infinite")
    c = tiny_config(pair, tmp_path, **{"rollout.top_k": 5, "loss.name": "jsd", "loss.jsd_beta": 0.0})
    _expect(c, r"config\.loss\.name='jsd' with loss\.jsd_beta=0 under")
    validate_config(tiny_config(pair, tmp_path, **{"rollout.top_k": 5, "loss.name": "jsd"}))
    c = tiny_config(pair, tmp_path)
    c.loss.normalise = "x"
    _expect(c, r"config\.loss\.normalise is not an OPD setting")


def test_tokenizer_and_template_mismatch(pair, tmp_path):
    import shutil
    from opdjax.data.tokenizer import build_toy_tokenizer
    other = tmp_path / "other_teacher"
    shutil.copytree(pair[0], other)
    for f in os.listdir(other):
        if f.startswith("tokenizer") or f.endswith(".jinja") or f == "special_tokens_map.json":
            os.remove(other / f)
    build_toy_tokenizer(str(other), vocab_size=400)
    c = tiny_config(pair, tmp_path)
    c.teacher.path = str(other)
    _expect(c, r"teacher and student tokenizers differ")

    # Same vocabulary, templates differ: refused with the fix named, accepted with the override.
    tmpl = tmp_path / "tmpl_teacher"
    shutil.copytree(pair[0], tmpl)
    cfg_path = tmpl / "tokenizer_config.json"
    tc = json.loads(cfg_path.read_text())
    jinja = tmpl / "chat_template.jinja"
    if "chat_template" in tc:
        tc["chat_template"] = tc["chat_template"].replace("<|im_start|>assistant", "<|im_start|>assistant ")
        cfg_path.write_text(json.dumps(tc))
    else:
        jinja.write_text(jinja.read_text().replace("<|im_start|>assistant", "<|im_start|>assistant "))
    c = tiny_config(pair, tmp_path)
    c.teacher.path = str(tmpl)
    _expect(c, r"chat_template.*--config\.tokenizer\.chat_template=student")
    c.tokenizer.chat_template = "student"
    validate_config(c)


@pytest.mark.integration
def test_compare_job_writes_the_report(pair, tmp_path):
    from opdjax.train import compare
    c = tiny_config(pair, tmp_path, **{"train.steps": 2, "checkpoint.every": 0, "metrics.pictures_every": 1,
                                       "mesh.shape": (1, -1, 1)})
    c.job = "opd_compare"
    c.compare.arms = ("bic", "random_matched")
    out = compare.run(c)
    assert set(out["arms"]) == {"bic", "random_matched"}
    assert "eval/greedy_accuracy" in out["untrained"]
    assert "eval_before" not in out["arms"]["random_matched"]  # the untrained student is evaluated once
    for f in ("report.md", "report.html", "accuracy.png", "curves.png", "compare.json"):
        assert os.path.getsize(tmp_path / f) > 0, f
    text = (tmp_path / "report.md").read_text()
    assert "## Verdict" in text and "release.mode=random_matched" in text and "pass@2" in text
    with pytest.raises(ValueError, match=r"config\.compare\.arms"):
        c2 = tiny_config(pair, tmp_path)
        c2.compare.arms = ("bic", "sometimes")
        compare.run(c2)


@pytest.mark.integration
def test_compare_over_seeds_is_deterministic_and_reports_intervals(pair, tmp_path):
    """compare.seeds: every arm at every seed in workdir/seed<N>/<arm>, a report with paired-bootstrap
    intervals; and the same seed twice on one machine gives identical metrics (timings aside)."""
    from opdjax.train import compare
    runs = {}
    for name, arms, seeds in (("one", ("bic", "full"), (0, 3)), ("two", ("bic",), (3,))):  # "two": seed 3's bic again
        c = tiny_config(pair, tmp_path / name, **{"train.steps": 2, "checkpoint.every": 0,
                                                  "metrics.pictures_every": 0, "mesh.shape": (1, -1, 1)})
        c.job = "opd_compare"
        c.compare.arms = arms
        c.compare.seeds = seeds
        runs[name] = compare.run(c)
    out = runs["one"]
    assert out["seeds"] == [0, 3] and set(out["runs"]) == {"0", "3"}
    for seed in ("0", "3"):
        assert "eval_before" in out["runs"][seed]["bic"] and "eval_before" not in out["runs"][seed]["full"]
        for arm in ("bic", "full"):
            pp = out["runs"][seed][arm]["eval_after_per_problem"]
            assert np.shape(pp["sample_correct"]) == (4, 2) and np.shape(pp["greedy_correct"]) == (4,)
            assert np.mean(pp["sample_correct"]) == out["runs"][seed][arm]["eval_after"]["eval/sample_accuracy"]
    boot = out["bootstrap"]["sample_accuracy"]
    assert (boot["seeds"], boot["problems"]) == (2, 4) and "bic - full" in boot["differences"]
    text = (tmp_path / "one" / "report.md").read_text()
    assert "## Verdict" in text and "2 seeds x 4 held-out problems" in text and "| 3 | full |" in text
    for f in ("report.html", "accuracy.png", "curves.png", "compare.json"):
        assert os.path.getsize(tmp_path / "one" / f) > 0, f
    # determinism: the same seed twice gives the same metrics at every step and the same evaluations
    for seed in ("3",):
        for arm in ("bic",):
            a = read_metrics(str(tmp_path / "one" / f"seed{seed}" / arm / "metrics.jsonl"))
            b = read_metrics(str(tmp_path / "two" / f"seed{seed}" / arm / "metrics.jsonl"))
            strip = lambda recs: [{k: v for k, v in r.items() if not k.startswith(("timing/", "perf/", "eval/seconds",
                                                                                    "time"))} for r in recs]
            assert strip(a) == strip(b), (seed, arm)
            for k in ("eval_after_per_problem", "eval_after"):
                sa, sb = out["runs"][seed][arm][k], runs["two"]["runs"][seed][arm][k]
                if k == "eval_after":
                    sa = {m: v for m, v in sa.items() if m != "eval/seconds"}
                    sb = {m: v for m, v in sb.items() if m != "eval/seconds"}
                assert sa == sb, (seed, arm, k)
