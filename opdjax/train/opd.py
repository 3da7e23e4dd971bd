"""The OPD job: prompts -> student rollouts -> teacher scoring -> release rule -> update.

    python launch/tpu_run.py --config configs/opd_demo.py          # the embedded toy pair

One step, as the data flows (ARCHITECTURE.md):
  1. sample    the current student answers `prompts_per_step` prompts `samples_per_prompt` times
               (jitted; records pi_old of each token and the student's top-K candidates)
  2. score     the frozen teacher scores the sampled tokens and the candidates (one chunked forward)
  3. release   margins -> sentences (NLTK Punkt, host) -> BIC scan -> release weights w [B, R];
               baselines (full / prefix_fraction / random_matched) only change w
  4. update    the jitted, donated train step: masked loss, optax AdamW
OPDJob supplies steps 1-4 and the evaluation; the trainer skeleton (opdjax.train.loop) runs the
schedule around them: restore-or-init, metrics, evaluation, checkpoints, preemption, export.

Randomness: step s uses fold_in(key(seed), s) for its rollouts and release baselines, so a run
resumed from the checkpoint at step s draws exactly what an uninterrupted run would have drawn,
and never reuses a rollout made before the checkpoint (rollouts are never stored).
"""
from __future__ import annotations

import collections.abc
import dataclasses
import functools
import logging
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from opdjax import losses, multihost, sharding
from opdjax.aot import job as aot_job
from opdjax.data import prompts as prompt_data
from opdjax.data.pipeline import DataPipeline
from opdjax.data import builders
from opdjax.data.sources import TFDS_PREFIX, open_source
from opdjax.eval.harness import evaluate
from opdjax.models import qwen
from opdjax.models.load import load_section
from opdjax.models.config import ModelConfig
from opdjax.rollout import stops
from opdjax.rollout.sampler import Rollout, SamplingSettings, sample
from opdjax.teachability import rule
from opdjax.teachability.scoring import TeacherScores, teacher_logprobs
from opdjax.train import metrics as metrics_lib
from opdjax.train import loop
from opdjax.train.loop import init_state, learning_rate_schedule, make_optimizer
from opdjax.train.step import TrainBatch, jit_train_step, state_shardings, step_settings_from_config
from opdjax.train.validate import load_tokenizer_for, validate_config

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------- set-up
class _LazyPrefix(collections.abc.Sequence):
    """A view of the first `limit` problems of a ProblemSet whose item i is `self._item(problem i)`,
    computed when first asked for: on a pod a process reads only the rows it feeds."""

    def __init__(self, problems, limit: int | None = None):
        self._problems, self._cache = problems, {}
        self._len = len(problems) if limit is None else min(int(limit), len(problems))

    def __len__(self):
        return self._len

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i)
        if not 0 <= i < self._len:
            raise IndexError(i)
        if i not in self._cache:
            self._cache[i] = self._item(self._problems[i])
        return self._cache[i]


class EncodedPrompts(_LazyPrefix):
    """Prompt ids of the first `limit` problems, each read and encoded once (eval, diagnosis)."""

    def __init__(self, encode, problems, limit: int | None = None):
        super().__init__(problems, limit)
        self._item = lambda problem: encode([problem])[0]


class Answers(_LazyPrefix):
    """The answers of the first `limit` problems, read when asked for."""

    def __init__(self, problems, limit: int):
        super().__init__(problems, limit)
        self._item = lambda problem: problem.answer


@dataclasses.dataclass
class Data:
    train: prompt_data.ProblemSet  # the training problems (read by the pipeline, each process its rows)
    eval_prompts: EncodedPrompts
    eval_answers: Answers
    prompt_len: int  # P: every prompt is left-padded to this many columns (one compile)


def _dtype(name):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def data_sources(config) -> tuple[tuple[str, str], tuple[str, str]]:
    """((spec, split) of the training problems, (spec, split) of the eval problems; spec "" = none).
    data.task=toy_arithmetic reads the shipped TFDS dataset of the embedded task (prepared in
    data.data_dir on first use): its first num_train / num_eval problems."""
    d = config.data
    if d.task == "toy_arithmetic":
        for field, n, low, cap in (("num_train", d.num_train, 1, builders.TOY_TRAIN),
                                   ("num_eval", d.num_eval, 0, builders.TOY_EVAL)):
            if not low <= int(n) <= cap:
                raise prompt_data.PromptDataError(f"data.{field}={n}: the shipped toy_arithmetic dataset holds "
                                                  f"{low}..{cap} problems of that split (num_eval=0: no evaluation).")
        name = f"{TFDS_PREFIX}opdjax_toy_arithmetic/seed{int(config.seed)}"
        return (name, f"train[:{int(d.num_train)}]"), ((name, f"eval[:{int(d.num_eval)}]") if d.num_eval else ("", ""))
    return (d.train_file, d.train_split), (d.eval_file, d.eval_split)


def problems_for(config) -> tuple[prompt_data.ProblemSet, prompt_data.ProblemSet | list]:
    """(train, eval) problem sets: opened and counted now, each record read when it is needed."""
    d = config.data
    (train_spec, train_split), (eval_spec, eval_split) = data_sources(config)
    # on every process; a source one process cannot open is an error on all of them (no one waits)
    opened = multihost.run_everywhere(lambda: open_source(
        train_spec, split=train_split, data_dir=d.data_dir, default_split="train", setting="data.train_file"),
        f"opening {train_spec}")
    train = prompt_data.ProblemSet(opened, prompt_field=d.prompt_field, answer_field=d.answer_field)
    ev = []
    if eval_spec:
        opened = multihost.run_everywhere(lambda: open_source(
            eval_spec, split=eval_split, data_dir=d.data_dir, default_split="test", setting="data.eval_file"),
            f"opening {eval_spec}")
        ev = prompt_data.ProblemSet(opened, prompt_field=d.prompt_field, answer_field=d.answer_field,
                                    required_answer=True)
    return train, ev


def encode_problems(config, tokenizer, template: str | None, problems) -> list:
    """Prompt ids of `problems` as the data section renders them (chat template, system prompt)."""
    return prompt_data.encode_prompts(tokenizer, problems, system_prompt=config.data.system_prompt,
                                      enable_thinking=config.data.enable_thinking,
                                      max_prompt_tokens=config.data.max_prompt_tokens, chat_template=template)


def encode_data(config, tokenizer, template: str | None) -> Data:
    """The train and eval problems. Every record is read, checked and rendered once up front, each
    process taking its share, to check its length (a bad or over-long record is an error naming it,
    on every process, before any compile) and to fix the padded width P; afterwards a process reads
    and encodes only the rows it feeds."""
    train, ev = problems_for(config)
    if len(train) < config.batch.prompts_per_step:
        raise prompt_data.PromptDataError(
            f"config.batch.prompts_per_step={config.batch.prompts_per_step} exceeds the {len(train)} training "
            f"prompts of {train.source.name} (split {train.source.split or 'all'!r}).")
    n_eval = min(len(ev), int(config.eval.num_problems))
    encode = functools.partial(encode_problems, config, tokenizer, template)

    def lengths_of(share):
        problems = [train[i] if i < len(train) else ev[i - len(train)] for i in share]
        return [len(r) for r in encode(problems)] if problems else []

    lengths = multihost.map_split(lengths_of, range(len(train) + n_eval), "reading and encoding the prompts",
                                  batched=True)
    return Data(train, EncodedPrompts(encode, ev, n_eval), Answers(ev, n_eval), max(lengths))


def train_pipeline(config, data: Data, encode, plan) -> DataPipeline:
    """The Grain pipeline of the training prompts: each step's prompts_per_step problems in one
    global order (seed, epoch); this process reads and encodes only the prompts of its rows."""
    b, s = config.batch.prompts_per_step, config.rollout.samples_per_prompt
    mine = multihost.feeding_rows(plan, (b * s, data.prompt_len), ("batch", "length"))
    positions = np.unique(np.asarray(mine) // s)  # rollout row r samples prompt position r // s
    trace = None
    if config.data.trace_reads:  # per process: which records it read at each step
        trace = os.path.join(config.workdir, "data_reads", f"process_{jax.process_index()}.jsonl")
        os.makedirs(os.path.dirname(trace), exist_ok=True)
    return DataPipeline(data.train, b, seed=config.seed, shuffle=config.data.shuffle, epoch_end="straddle",
                        positions=positions, transform=lambda i, problem: encode([problem])[0],
                        name="training prompts", trace=trace)


def sampling_settings(config, settings, tokenizer, cfg) -> SamplingSettings:
    """The rollout section as the sampler's settings (records the release rule's top-K)."""
    r = config.rollout
    return SamplingSettings(r.max_new_tokens, float(r.temperature), float(r.top_p), int(r.top_k), settings.top_k,
                            stops.stop_ids(tokenizer, (cfg,), r.stop_tokens), r.cache_dtype).check(cfg.vocab_size)


# ---------------------------------------------------------------------------------- one step
@dataclasses.dataclass(frozen=True)
class Phases:
    """What sampling, scoring and the release decision need besides the weights and the prompts."""
    config: Any  # the OPD config (loss, rollout and batch sections)
    release: rule.ReleaseSettings
    sampling: SamplingSettings
    student_cfg: ModelConfig
    teacher_cfg: ModelConfig
    tokenizer: Any  # the student's
    prompt_len: int  # P: every prompt is left-padded to this many columns (one compile)
    plan: sharding.ShardingPlan


class ScoredRollouts(NamedTuple):
    """Steps 1-2 of one batch, and its sentence split."""
    rollout: Rollout
    scores: TeacherScores
    segments: Any  # rule.segment_rows of this process's rows
    tokens: jax.Array  # [B, P+R] prompt + response
    mask: jax.Array  # [B, P+R]
    old_logp: jax.Array  # [B, R] pi_old of y_t (rollout.old_logp: as sampled, or the model's)
    old_cand_logp: jax.Array  # [B, R, K] pi_old of the candidates
    timings: dict  # sample_s, score_s, segment_s


class Released(NamedTuple):
    """Steps 1-3 of one batch: the train step's input and what produced it."""
    batch: TrainBatch
    decision: rule.ReleaseDecision
    scored: ScoredRollouts


def prompt_batch(plan, prompts, rows, pad_id: int, prompt_len: int):
    """Global (tokens, mask) [B, P] of the prompts `rows` (indices into `prompts`), left-padded to
    prompt_len; each process encodes and places only the rows its devices hold."""
    shape = (len(rows), prompt_len)
    mine = multihost.feeding_rows(plan, shape, ("batch", "length"))
    tok, mask = prompt_data.left_pad([prompts[rows[i]] for i in mine], pad_id, length=prompt_len)
    return (multihost.from_local_rows(plan, tok, ("batch", "length"), shape),
            multihost.from_local_rows(plan, mask, ("batch", "length"), shape))


def rollout_and_score(ph: Phases, student_params, teacher_params, prompts, rows, key, *,
                      overlap_segments: bool = True) -> ScoredRollouts:
    """Steps 1-2 and the sentence split for the prompts `rows` (indices into `prompts`); the OPD
    step and the diagnosis share it.

    overlap_segments: split sentences on the host while the device scores (the trainer). False
    waits for the scores first, so that score_s and segment_s do not contain each other (the
    diagnosis reports them apart)."""
    timings = {}
    tok_d, pmask_d = prompt_batch(ph.plan, prompts, rows, ph.tokenizer.pad_token_id, ph.prompt_len)

    t = time.perf_counter()
    roll = jax.block_until_ready(sample(student_params, tok_d, pmask_d, jax.random.fold_in(key, 0), ph.student_cfg,
                                        ph.sampling, pad_id=ph.tokenizer.pad_token_id, plan=ph.plan))
    timings["sample_s"] = time.perf_counter() - t

    # Teacher scoring is dispatched asynchronously; the host splits the responses into sentences
    # (they depend on the sampled tokens only) while the device scores. Each process splits the
    # rows its own devices hold.
    t = time.perf_counter()
    full = jnp.concatenate([tok_d, roll.tokens], axis=1)
    fmask = jnp.concatenate([pmask_d, roll.mask], axis=1)
    c = ph.config
    scores = teacher_logprobs(teacher_params, full, fmask, roll.topk_ids, cfg=ph.teacher_cfg, prompt_len=ph.prompt_len,
                              chunk_tokens=c.loss.chunk_tokens, plan=ph.plan, microbatches=c.batch.microbatches)
    if not overlap_segments:
        jax.block_until_ready(scores)
    t_seg = time.perf_counter()
    segments = rule.segment_rows(ph.release, ph.tokenizer, roll.tokens, roll.mask, ph.plan)
    timings["segment_s"] = time.perf_counter() - t_seg  # host, overlapped with scoring
    jax.block_until_ready(scores)
    # scoring wall time; with overlap_segments the segmentation runs inside it
    timings["score_s"] = time.perf_counter() - t - (0.0 if overlap_segments else timings["segment_s"])
    if c.rollout.old_logp == "sampled":
        old = (roll.logp_sampled, roll.topk_logp_sampled)
    else:
        old = (roll.logp_model, roll.topk_logp_model)
    return ScoredRollouts(roll, scores, segments, full, fmask, *old, timings)


def rollout_and_release(ph: Phases, student_params, teacher_params, prompts, rows, key) -> Released:
    """Steps 1-3 for the prompts `rows`: rollouts, teacher scores, release decision, the train batch."""
    sc = rollout_and_score(ph, student_params, teacher_params, prompts, rows, key)
    roll, scores = sc.rollout, sc.scores
    t = time.perf_counter()
    decision = rule.decide_release(
        ph.release, tokenizer=ph.tokenizer, response_ids=roll.tokens, response_mask=roll.mask,
        teacher_sampled_logp=scores.sampled_logp, teacher_cand_logp=scores.candidate_logp,
        student_sampled_logp=sc.old_logp, student_cand_logp=sc.old_cand_logp, candidate_ids=roll.topk_ids,
        key=jax.random.fold_in(key, 1), segments=sc.segments, plan=ph.plan)
    coeff = losses.token_coefficients(decision.weights, roll.mask, ph.config.loss.normalize)
    advantage = jnp.where(roll.mask, decision.advantage, 0.0)
    batch = TrainBatch(sc.tokens, sc.mask, losses.LossInputs(roll.tokens, sc.old_logp, advantage, roll.topk_ids,
                                                             scores.candidate_logp), coeff)
    batch = jax.block_until_ready(batch)
    sc.timings["release_s"] = time.perf_counter() - t
    return Released(batch, decision, sc)


@jax.jit
def _rollout_stats(mask, advantage, teacher_sampled_logp, student_logp_model):
    """Scalars of one batch of rollouts, reduced on device (so that no process fetches [B, R])."""
    maskf = mask.astype(jnp.float32)
    n_tok = jnp.maximum(jnp.sum(maskf), 1.0)
    adv = jnp.where(mask, advantage, 0.0)
    return {"teacher/sampled_logp_mean": jnp.sum(jnp.where(mask, teacher_sampled_logp, 0.0)) / n_tok,
            "teacher/advantage_mean": jnp.sum(adv) / n_tok,
            "teacher/advantage_abs_mean": jnp.sum(jnp.abs(adv)) / n_tok,
            "rollout/student_logp_mean": jnp.sum(jnp.where(mask, student_logp_model, 0.0)) / n_tok,
            "rollout/mean_tokens": jnp.mean(jnp.sum(maskf, axis=1)),
            "rollout/max_tokens_share": jnp.mean(jnp.all(mask, axis=1).astype(jnp.float32)),
            "rollout/tokens": jnp.sum(mask.astype(jnp.int32))}


def rollout_metrics(decision, roll, scores) -> dict:
    """The release rule's and the rollout's metrics of one batch, as host scalars (collective)."""
    m = {}
    for k, v in rule.summary(decision).items():
        if isinstance(v, list):  # the decile curve: one scalar per decile
            m.update({f"release/{k}_{i}": float(x) for i, x in enumerate(v)})
        else:
            m[f"release/{k}"] = v
    stats = multihost.to_host(_rollout_stats(roll.mask, decision.advantage, scores.sampled_logp, roll.logp_model))
    m.update({k: (int(v) if k == "rollout/tokens" else float(v)) for k, v in stats.items()})
    return m


def step_metrics(rollout_part: dict, step_out, timings, lr) -> dict:
    """One step's record: the rollout metrics, the train step's outputs, timings, throughput."""
    m = dict(rollout_part)
    m.update({k: float(v) for k, v in step_out.items()})
    m.update({f"timing/{k}": v for k, v in timings.items()})
    step_s = sum(v for k, v in timings.items() if k != "segment_s")  # segment_s is inside score_s
    m["timing/step_s"] = step_s
    # the release rule's own cost: the decision after scoring, plus the host segmentation
    # (overlapped with scoring on an accelerator; on a CPU it competes for the same cores)
    m["timing/release_share"] = timings["release_s"] / step_s
    m["timing/release_share_incl_segments"] = (timings["release_s"] + timings["segment_s"]) / step_s
    m["perf/rollout_tokens_per_s"] = m["rollout/tokens"] / step_s
    m["optimizer/learning_rate"] = float(lr)
    return m


# ---------------------------------------------------------------------------------- the job
class OPDJob:
    """OPD's part of the trainer (opdjax.train.loop): the set-up, how a step's batch is made
    (prompts -> rollouts -> teacher scores -> release) and its loss, and the evaluation."""

    def __init__(self, config):
        self.config = config
        self.t_start = time.perf_counter()
        os.makedirs(config.workdir, exist_ok=True)
        self.tokenizer = student_tok = load_tokenizer_for(config.student, "student")
        teacher_tok = load_tokenizer_for(config.teacher, "teacher")
        checked = validate_config(config, tokenizers=(student_tok, teacher_tok))
        # release.from_diagnosis: log what it applied, warn on mismatches and on "not detected"
        self.release_warning = rule.log_from_diagnosis(config)
        self.student_cfg, self.teacher_cfg = checked.student_cfg, checked.teacher_cfg
        template = {"": None, "student": student_tok.chat_template, "teacher": teacher_tok.chat_template}[
            config.tokenizer.chat_template]
        self.data = data = encode_data(config, student_tok, template)
        self.plan = plan = sharding.plan_from_config(config.mesh)
        mesh = plan.mesh
        log.info("mesh %s; rollout rows/step %d; prompt columns %d; %d train / %d eval prompts",
                 dict(mesh.shape), checked.rollout_rows, data.prompt_len, len(data.train), len(data.eval_prompts))
        self.steps = steps = config.train.steps
        self.tx = tx = make_optimizer(config.optimizer, steps)
        self.lr_at = learning_rate_schedule(config.optimizer, steps)
        dtype = _dtype(config.student.dtype)
        self.state_sh = state_shardings(tx, self.student_cfg, plan, dtype)
        self.abstract = loop.abstract_state(tx, qwen.abstract_params(self.student_cfg, dtype), self.state_sh)
        self.root = jax.random.key(config.seed)
        self.pipeline = train_pipeline(config, data, functools.partial(encode_problems, config, student_tok, template),
                                       plan)
        self.phases = Phases(config, checked.release, sampling_settings(config, checked.release, student_tok,
                                                                        self.student_cfg),
                             self.student_cfg, self.teacher_cfg, student_tok, data.prompt_len, plan)
        step_settings = step_settings_from_config(config, data.prompt_len)
        self.train_step = jit_train_step(tx, self.student_cfg, self.teacher_cfg, step_settings, plan, dtype)
        self.eval_key = jax.random.key(config.seed + 1)  # same eval draws for every run / arm / step
        self.teacher_params = self.writer = None
        self.record_rows = False  # benchmarks: keep each step's prompt rows and shapes (self.rows_log)
        self.rows_log = []

    def start(self) -> loop.Start:
        """Restore the latest checkpoint or load the student; then the teacher. Opens the metrics."""
        config, plan = self.config, self.plan
        self.ckpt = loop.checkpointer(config)
        rng_abstract = jax.ShapeDtypeStruct(jax.random.key_data(self.root).shape, jnp.uint32,
                                            sharding=plan.sharding(()))
        aot_job.check_at_start(config, plan, "opd")  # TPU: does every phase fit this slice? (before any weight)

        def init():
            params = load_section(config.student, plan)[0]
            return {"train": jax.jit(lambda p: init_state(p, self.tx), out_shardings=self.state_sh)(params)}

        start = loop.restore_or_init(self.ckpt, {"train": self.abstract, "rng": rng_abstract}, self.pipeline, init)
        if "rng" in start.tree:
            self.root = jax.random.wrap_key_data(start.tree["rng"])
        self.teacher_params = load_section(config.teacher, plan)[0]
        # the run's key as a replicated global array: a pod checkpoints only global arrays
        self.rng_global = multihost.to_global(plan, multihost.to_host(jax.random.key_data(self.root)), (None,))
        self.writer = metrics_lib.writer_for(config.workdir, tensorboard=config.metrics.tensorboard,
                                             resume_step=start.step)
        return start

    def step(self, step: int, state) -> loop.StepResult:
        config, plan = self.config, self.plan
        key = jax.random.fold_in(self.root, step)
        batch_data = next(self.pipeline)  # this step's prompts; this process's rows read and encoded
        prompts = batch_data.by_index()
        rows = [int(i) for i in batch_data.indices for _ in range(config.rollout.samples_per_prompt)]
        rel = rollout_and_release(self.phases, state["params"], self.teacher_params, prompts, rows, key)
        roll, timings = rel.scored.rollout, rel.scored.timings
        m = rollout_metrics(rel.decision, roll, rel.scored.scores)  # before the update is queued behind them
        every = config.metrics.pictures_every
        pictures = every and (step + 1) % every == 0 and multihost.is_writer()
        if pictures:  # process 0 draws from the rows its own devices hold
            pictures = rule.local_picture_rows(rel.decision, roll.tokens, roll.mask, plan)
        t = time.perf_counter()
        state, out = self.train_step(state, rel.batch, self.teacher_params)
        # CPU: one step in flight at a time (simulated-device collectives). TPU/GPU: the host
        # writes this step's rollout record and pictures while the device updates.
        multihost.block_on_cpu(out)
        if pictures:
            rule.write_pictures(pictures, os.path.join(config.workdir, "pictures"), step + 1, tokenizer=self.tokenizer,
                                margin_name=self.phases.release.margin,
                                max_trajectories=config.metrics.pictures_per_step)
        out = multihost.to_host(out)
        timings["update_s"] = time.perf_counter() - t
        m = step_metrics(m, out, timings, self.lr_at(step))
        if self.record_rows:
            self.rows_log.append({"prompts": [list(map(int, prompts[j])) for j in rows],
                                  "response_columns": rel.batch.tokens.shape[1] - self.data.prompt_len,
                                  "train_columns": rel.batch.tokens.shape[1]})  # static shapes: host ints
        return loop.StepResult(state, m, m["rollout/tokens"],
                               {"loss": m["loss/total"], "kept": m.get("release/kept_share", float("nan"))})

    def evaluate(self, step: int, params) -> dict:
        """Sampled and greedy accuracy on the held-out prompts (config.eval), logged at `step`."""
        c, data = self.config, self.data
        if not len(data.eval_prompts):
            return {}
        res = evaluate(params, self.student_cfg, self.tokenizer, data.eval_prompts, data.eval_answers,
                       samples=c.eval.samples, ks=tuple(c.eval.k), temperature=float(c.eval.temperature),
                       greedy=c.eval.greedy, max_new_tokens=c.eval.max_new_tokens,
                       stop_ids=self.phases.sampling.stop_ids, key=self.eval_key, plan=self.plan,
                       prompt_len=data.prompt_len)
        self.writer.write(step, res.metrics)
        # per problem, for the multi-seed comparison's paired bootstrap (compare.py)
        self.last_eval_per_problem = {
            "sample_correct": np.asarray(res.correct, bool).tolist(),
            "greedy_correct": None if res.greedy_correct is None else np.asarray(res.greedy_correct, bool).tolist()}
        self.writer.write_text(step, "eval/example", "\n\n".join(f"Q: {i}\nA: {t[0]}" for i, t in zip(
            range(2), res.texts)))
        log.info("eval at step %d: %s", step, {k: round(v, 4) for k, v in res.metrics.items()})
        return res.metrics

    def checkpoint_items(self):
        return {"rng": self.rng_global}, {"wall_s": time.perf_counter() - self.t_start}


def run(config) -> dict:
    """Train; returns a summary dict (also written to workdir/summary.json)."""
    job = OPDJob(config)
    start = job.start()
    steps = job.steps
    summary = {"workdir": config.workdir, "release_mode": job.phases.release.mode, "loss": config.loss.name,
               "start_step": start.step, "steps": steps}
    if job.release_warning:  # the diagnosis behind release.from_diagnosis found no collapse
        summary["release_warning"] = job.release_warning
    if start.step == 0 and config.eval.num_problems and config.eval.before:
        summary["eval_before"] = job.evaluate(0, start.tree["train"]["params"])
        summary["eval_before_per_problem"] = job.last_eval_per_problem
    done = loop.train(job, config, state=start.tree["train"], start=start.step, steps=steps, pipeline=job.pipeline,
                      ckpt=job.ckpt, writer=job.writer, eval_every=config.eval.every)
    state = done.state
    counters = multihost.to_host({"step": state["step"], "skipped": state["skipped"]})
    summary["preempted"] = done.preempted
    summary["final_step"] = int(counters["step"])
    summary["skipped_updates"] = int(counters["skipped"])
    if not done.preempted:
        if config.checkpoint.export_hf:
            summary["student_hf"] = loop.export_student(config.workdir, state["params"], job.student_cfg,
                                                        job.tokenizer)
        if config.eval.num_problems:
            summary["eval_after"] = job.evaluate(steps, state["params"])
            summary["eval_after_per_problem"] = job.last_eval_per_problem
    summary.update(_averages(done.records))
    summary["wall_s"] = time.perf_counter() - job.t_start
    job.writer.close()
    job.ckpt.close()
    loop.write_summary(config.workdir, "summary.json", summary)
    summary["final_params"] = state["params"]
    return summary


def _averages(per_step) -> dict:
    """Means over steps (the first step's timings include compilation and are left out)."""
    if not per_step:
        return {}
    out = {}
    timed = per_step[1:] or per_step
    for k in ("timing/sample_s", "timing/score_s", "timing/segment_s", "timing/release_s", "timing/update_s",
              "timing/step_s", "perf/rollout_tokens_per_s", "timing/release_share_incl_segments"):
        out[f"mean_{k}"] = float(np.mean([m[k] for m in timed]))
    out["mean_timing/release_share"] = out["mean_timing/release_s"] / out["mean_timing/step_s"]
    for k in ("release/release_rate", "release/rule_release_rate", "release/kept_share",
              "release/shuffled_release_rate", "loss/total"):
        vals = [m[k] for m in per_step if k in m]
        if vals:
            out[f"mean_{k}"] = float(np.mean(vals))
    return out
