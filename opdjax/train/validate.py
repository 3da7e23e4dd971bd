"""Config validation for every job, in one place, before anything is loaded onto a device or
compiled: the shared sections of opdjax.schema once (mesh, batch, optimizer, loss, rollout, data,
checkpoint, model roles), then each job's own (`validate_config` for OPD, `check_diagnose_section`,
`validate_dail_train`, `validate_dail_synthesis`).

Every message names the config field (as it would be written on the command line) and says
what to do. Checks that need the checkpoints read only their small files (config.json,
tokenizer files); the weights are loaded after this passes.
"""
from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections
import numpy as np

from opdjax import losses, sharding
from opdjax.dail import config as dail_config_lib, contrastive
from opdjax.dail.hints import check_hint_config
from opdjax.dail.prompts import check_templates
from opdjax.data.sources import missing_local_path
from opdjax.models import attention as attention_lib, lora
from opdjax.models.config import ModelConfig
from opdjax.schema import MOVED
from opdjax.teachability import margins
from opdjax.teachability.rule import ReleaseSettings, settings_from_config
from opdjax.train.config import opd_config


from opdjax.errors import ConfigError  # noqa: E402 (the one config error, shared with models.config)
from opdjax.models import gguf_io
from opdjax.data.tokenizer import load_tokenizer
from opdjax.data.tokenizer import TokenizerMismatchError, check_same_tokenizer
from opdjax.train import memory
from opdjax.dail.memory_estimate import check_fits, estimate_dail_memory


@dataclasses.dataclass(frozen=True)
class CheckedConfig:
    """What validation resolved: model configs (from config.json), release settings, sizes."""
    student_cfg: ModelConfig
    teacher_cfg: ModelConfig
    release: ReleaseSettings
    rollout_rows: int  # prompts_per_step * samples_per_prompt
    mesh_shape: tuple[int, int, int]


def moved_error(name: str) -> ConfigError | None:
    """The error for a field name that moved to the shared vocabulary (opdjax.schema.MOVED)."""
    if name in MOVED:
        return ConfigError(f"{name} moved to {MOVED[name]}: set --config.{MOVED[name]} instead.")
    return None


def check_moved_overrides(argv) -> None:
    """Command-line overrides (--config.a.b=v) under a moved name: ml_collections would only say
    the key is unknown, so name the new one first."""
    for arg in argv:
        name = arg.split("=", 1)[0].removeprefix("--config.")
        if arg.startswith("--config.") and (e := moved_error(name)):
            raise e


def check_unknown_fields(c, schema, prefix="", *, kind="an OPD", where="opdjax/train/config.py"):
    """Every field of `c` must exist in `schema` (a typo is an error, never silently ignored)."""
    for k in c.keys():
        name = f"{prefix}{k}"
        if k not in schema:
            if e := moved_error(name):
                raise e
            raise ConfigError(f"config.{name} is not {kind} setting; known in {prefix or 'config.'}: "
                              f"{', '.join(sorted(schema.keys()))}. (Typo? See {where}.)")
        if isinstance(c[k], ml_collections.ConfigDict) and k != "release" and isinstance(schema[k], ml_collections.ConfigDict):
            check_unknown_fields(c[k], schema[k], name + ".", kind=kind, where=where)


def check_optimizer(o) -> None:
    """The `optimizer` section (shared by the OPD and DAIL configs)."""
    if o.schedule not in ("constant", "cosine", "linear"):
        raise ConfigError(f"config.optimizer.schedule={o.schedule!r}: choose constant, cosine or linear.")
    if not o.learning_rate > 0:
        raise ConfigError(f"config.optimizer.learning_rate={o.learning_rate!r} must be > 0.")
    if not (isinstance(o.warmup_steps, int) and 0 <= o.warmup_steps):
        raise ConfigError(f"config.optimizer.warmup_steps={o.warmup_steps!r} must be an integer >= 0.")
    if o.grad_clip < 0:
        raise ConfigError(f"config.optimizer.grad_clip={o.grad_clip!r} must be >= 0 (0 = off).")
    if o.weight_decay < 0:
        raise ConfigError(f"config.optimizer.weight_decay={o.weight_decay!r} must be >= 0.")


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def check_positive_ints(section, name: str, fields) -> None:
    for f in fields:
        v = section[f]
        if not (_is_int(v) and v >= 1):
            raise ConfigError(f"config.{name}.{f}={v!r} must be an integer >= 1.")


def check_mesh(m, num_devices: int | None = None) -> tuple[int, int, int]:
    """mesh.shape against the devices, and the form of mesh.sharding_rules; the resolved shape."""
    n_dev = jax.device_count() if num_devices is None else num_devices
    try:
        sharding.rules_from_config(tuple(m.sharding_rules), field="config.mesh.sharding_rules")
        return sharding.mesh_shape_from_config(tuple(m.shape), n_dev, field="config.mesh.shape")
    except sharding.ShardingError as e:
        raise ConfigError(str(e)) from e


def check_batch_split(rows: int, rows_are: str, change: str, microbatches: int, mesh_shape) -> None:
    """A step's `rows` split into batch.microbatches, each split over the batch shards (data x fsdp)."""
    shards = mesh_shape[0] * mesh_shape[1]
    if rows % (microbatches * shards):
        raise ConfigError(
            f"config.batch: {rows} {rows_are} must be divisible by batch.microbatches={microbatches} x batch "
            f"shards {shards} (mesh data x fsdp = {mesh_shape[0]} x {mesh_shape[1]}); change {change}, "
            "microbatches or mesh.shape.")


def check_rollout(r) -> None:
    """The shared rollout fields (max_new_tokens, cache_dtype)."""
    check_positive_ints(r, "rollout", ("max_new_tokens",))
    if r.cache_dtype not in ("", "float32", "bfloat16"):
        raise ConfigError(f"config.rollout.cache_dtype={r.cache_dtype!r}: choose '' (the params' dtype), "
                          "float32 or bfloat16.")


def check_policy(r, loss) -> None:
    """The sampling transform against the policy the OPD loss trains (train/step.py). With
    rollout.old_logp="sampled", pi_old, A_t and pi_theta are all the sampling distribution
    (temperature, top-k, top-p), so the transform must define a density and a finite loss."""
    if r.old_logp != "sampled":
        return
    if r.temperature == 0:
        raise ConfigError(
            "config.rollout.temperature=0 (greedy) with config.rollout.old_logp='sampled': greedy rollouts have no "
            "density (every candidate but the argmax has log-prob -inf), so every release margin is undefined, the "
            "rule can never fire and the policy-gradient ratio is meaningless. Sample on-policy with "
            "rollout.temperature > 0 (1.0 = the student's own distribution), or set rollout.old_logp='model' to "
            "train the plain softmax on greedy rollouts.")
    truncated = r.top_k > 0 or r.top_p < 1.0
    forward_kl = loss.name == "forward_kl_full" or (loss.name == "jsd" and loss.jsd_beta == 0.0)
    if truncated and forward_kl:
        raise ConfigError(
            f"config.loss.name={loss.name!r}{' with loss.jsd_beta=0' if loss.name == 'jsd' else ''} under "
            f"config.rollout.top_k={r.top_k} / top_p={r.top_p}: the policy trained is the truncated sampling "
            "distribution (rollout.old_logp='sampled'), which gives 0 probability to tokens the teacher "
            "supports, so KL(teacher || student) is infinite. Use rollout.top_k=0 and top_p=1.0, a reverse or "
            "mixed divergence (reverse_kl_full, reverse_kl_topk, jsd with jsd_beta > 0, pg), or "
            "rollout.old_logp='model' to train the untruncated softmax.")


def check_checkpoint(ck) -> None:
    if not (_is_int(ck.every) and ck.every >= 0):
        raise ConfigError(f"config.checkpoint.every={ck.every!r} must be an integer >= 0 (0 = only at the end).")
    if not (_is_int(ck.keep) and ck.keep >= 1):
        raise ConfigError(f"config.checkpoint.keep={ck.keep!r} must be >= 1.")


def check_shared(c) -> None:
    """The sections every training job has (opdjax.schema), before any file is read."""
    check_attention(c.model.attention)
    check_positive_ints(c.batch, "batch", ("microbatches",))
    check_positive_ints(c.loss, "loss", ("chunk_tokens",))
    check_positive_ints(c.data, "data", ("max_prompt_tokens",))
    check_rollout(c.rollout)
    check_optimizer(c.optimizer)
    check_checkpoint(c.checkpoint)


def model_cfg(section, name, attention: str | None = None) -> ModelConfig:
    """config.<name>'s ModelConfig (config.json or GGUF header). With `attention` (the value of
    config.model.attention) its attention kernel is resolved for this backend and logged."""
    if attention is not None:
        check_attention(attention)  # before reading any file
    cfg = _model_cfg_from_files(section, name)
    if attention is None:
        return cfg
    try:
        return attention_lib.resolve(cfg, attention, section.dtype, name=name)
    except attention_lib.AttentionConfigError as e:
        raise ConfigError(str(e)) from e


def check_attention(value) -> None:
    try:
        attention_lib.check_choice(value)
    except attention_lib.AttentionConfigError as e:
        raise ConfigError(str(e)) from None


def _model_cfg_from_files(section, name) -> ModelConfig:
    m = section
    if m.dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"config.{name}.dtype={m.dtype!r}: choose float32 or bfloat16.")
    if m.gguf:
        if not os.path.isfile(m.gguf):
            raise ConfigError(f"config.{name}.gguf={m.gguf!r} does not exist; give a GGUF file path.")
        return gguf_io.config_from_gguf(m.gguf)
    if not m.path:
        raise ConfigError(f"config.{name}.path is empty; give a Hugging Face checkpoint directory "
                          f"(--config.{name}.path=/path/to/ckpt) or a GGUF file (--config.{name}.gguf=...).")
    if not os.path.isfile(os.path.join(m.path, "config.json")):
        raise ConfigError(f"config.{name}.path={m.path!r} has no config.json; give a Hugging Face checkpoint "
                          "directory (config.json, *.safetensors, tokenizer files).")
    return ModelConfig.from_pretrained(m.path)


def load_tokenizer_for(section, name):
    """The tokenizer of config.<name> (HF directory or GGUF); errors name the field."""
    if section.gguf:
        return gguf_io.load_gguf_tokenizer(section.gguf)
    try:
        return load_tokenizer(section.path)
    except Exception as e:  # noqa: BLE001 - re-raised with the field name
        raise ConfigError(f"config.{name}.path={section.path!r}: cannot load its tokenizer ({e}).") from e


def check_tokenizers(c, student_tok, teacher_tok) -> None:
    if c.tokenizer.chat_template not in ("", "student", "teacher"):
        raise ConfigError(f"config.tokenizer.chat_template={c.tokenizer.chat_template!r}: choose '' (must "
                          "match), 'student' or 'teacher'.")
    ignore = ("chat_template",) if c.tokenizer.chat_template else ()
    try:
        check_same_tokenizer(teacher_tok, student_tok, "teacher", "student", ignore=ignore)
    except TokenizerMismatchError as e:
        hint = ("" if ignore or "chat_template" not in str(e) else
                " If the templates differ only in branches your prompts never use, set "
                "--config.tokenizer.chat_template=student to render every prompt with the student's.")
        raise ConfigError(f"teacher and student tokenizers differ (config.teacher / config.student): {e}{hint}") from e


def validate_config(c, *, num_devices: int | None = None, tokenizers=None) -> CheckedConfig:
    """Raise ConfigError naming the field; return what was resolved. `tokenizers` = (student,
    teacher) already loaded (else loaded here from the checkpoint directories)."""
    check_unknown_fields(c, opd_config())
    check_shared(c)
    if c.loss.name not in losses.LOSSES:
        raise ConfigError(f"config.loss.name={c.loss.name!r} is unknown; choose one of {', '.join(losses.LOSSES)}.")
    if c.loss.normalize not in losses.NORMALIZATIONS:
        raise ConfigError(f"config.loss.normalize={c.loss.normalize!r}: choose one of "
                          f"{', '.join(losses.NORMALIZATIONS)}.")
    if not c.loss.clip_eps > 0:
        raise ConfigError(f"config.loss.clip_eps={c.loss.clip_eps!r} must be > 0.")
    if not 0.0 <= c.loss.jsd_beta <= 1.0:
        raise ConfigError(f"config.loss.jsd_beta={c.loss.jsd_beta!r} must lie in [0, 1].")
    try:
        release = settings_from_config(c.release)
    except ValueError as e:
        raise ConfigError(f"config.{e}") from e
    if c.rollout.old_logp not in ("sampled", "model"):
        raise ConfigError(f"config.rollout.old_logp={c.rollout.old_logp!r}: choose 'sampled' (the distribution "
                          "sampled from) or 'model' (the student's softmax).")
    check_positive_ints(c.rollout, "rollout", ("samples_per_prompt",))
    check_positive_ints(c.batch, "batch", ("prompts_per_step",))
    check_positive_ints(c.train, "train", ("steps",))
    e = c.eval
    if not (isinstance(e.samples, int) and e.samples >= 1):
        raise ConfigError(f"config.eval.samples={e.samples!r} must be an integer >= 1.")
    for k in e.k:
        if not (isinstance(k, int) and 1 <= k <= e.samples):
            raise ConfigError(f"config.eval.k contains {k!r}: every k must be in [1, eval.samples={e.samples}] "
                              "(pass@k needs n >= k samples per problem); raise eval.samples or drop that k.")

    # Data files.
    if c.data.task not in ("", "toy_arithmetic"):
        raise ConfigError(f"config.data.task={c.data.task!r}: choose '' (read data.train_file) or 'toy_arithmetic'.")
    if not c.data.task:
        if not c.data.train_file:
            raise ConfigError("config.data.train_file is empty; give a prompt source: a JSONL/Parquet/ArrayRecord file, a TFDS or save_to_disk directory, or tfds:NAME "
                              "(or data.task='toy_arithmetic' for the embedded task).")
        for f in ("train_file", "eval_file"):
            p = c.data[f]
            if missing_local_path(p):  # the source itself is opened (and checked) with the data
                raise ConfigError(f"config.data.{f}={p!r} does not exist.")

    # Models: config.json only (cheap), then sizes that depend on them.
    student_cfg = model_cfg(c.student, "student", attention=c.model.attention)
    teacher_cfg = model_cfg(c.teacher, "teacher", attention=c.model.attention)
    if student_cfg.vocab_size != teacher_cfg.vocab_size:
        raise ConfigError(f"config.teacher vocab_size {teacher_cfg.vocab_size} != config.student vocab_size "
                          f"{student_cfg.vocab_size}: OPD needs one tokenizer for both models.")
    V = student_cfg.vocab_size
    if release.top_k > V:
        raise ConfigError(f"config.release.top_k={release.top_k} exceeds the vocabulary size {V}.")
    if c.rollout.top_k > V:
        raise ConfigError(f"config.rollout.top_k={c.rollout.top_k} exceeds the vocabulary size {V}.")
    if not 0 < c.rollout.top_p <= 1 or c.rollout.temperature < 0:
        raise ConfigError("config.rollout.top_p must be in (0, 1] and config.rollout.temperature >= 0 "
                          f"(got {c.rollout.top_p!r}, {c.rollout.temperature!r}).")
    check_policy(c.rollout, c.loss)

    # Mesh and batch divisibility.
    n_dev = jax.device_count() if num_devices is None else num_devices
    mesh_shape = check_mesh(c.mesh, n_dev)
    rows = c.batch.prompts_per_step * c.rollout.samples_per_prompt
    check_batch_split(rows, f"rollout rows per step (batch.prompts_per_step={c.batch.prompts_per_step} x "
                      f"rollout.samples_per_prompt={c.rollout.samples_per_prompt})",
                      "prompts_per_step, samples_per_prompt", c.batch.microbatches, mesh_shape)

    # Tokenizers and chat template: the teacher must see the student's exact ids.
    student_tok, teacher_tok = tokenizers if tokenizers else (load_tokenizer_for(c.student, "student"),
                                                              load_tokenizer_for(c.teacher, "teacher"))
    check_tokenizers(c, student_tok, teacher_tok)

    if c.chip != "cpu":
        est = memory.estimate_memory(c, student_cfg, teacher_cfg, num_devices=n_dev, chip=c.chip)
        memory.check_fits(est, c, student_cfg, teacher_cfg)
    return CheckedConfig(student_cfg, teacher_cfg, release, rows, mesh_shape)


# ------------------------------------------------------------------------------------ diagnose
def check_diagnose_section(d) -> None:
    """Names the `diagnose.*` field and the fix; before any model is loaded."""
    if not (_is_int(d.num_prompts) and d.num_prompts >= 0):
        raise ConfigError(f"config.diagnose.num_prompts={d.num_prompts!r} must be an integer >= 0 (0 = all).")
    variants = tuple(d.variants)
    if not variants:
        raise ConfigError("config.diagnose.variants is empty; name at least one of "
                          f"{', '.join(margins.MARGIN_VARIANTS)}.")
    for v in variants:
        if v not in margins.MARGIN_VARIANTS:
            raise ConfigError(f"config.diagnose.variants contains {v!r}; choose among "
                              f"{', '.join(margins.MARGIN_VARIANTS)}.")
    if len(set(variants)) != len(variants):
        raise ConfigError(f"config.diagnose.variants={variants!r} names a variant twice.")
    if not 0 < d.significance < 1:
        raise ConfigError(f"config.diagnose.significance={d.significance!r} must lie in (0, 1).")
    if not (_is_int(d.examples) and d.examples >= 0):
        raise ConfigError(f"config.diagnose.examples={d.examples!r} must be an integer >= 0.")


# ------------------------------------------------------------------------------------ DAIL
def check_dail_shared(config, num_devices: int | None = None) -> tuple[int, int, int]:
    """What every DAIL job reads: field names, the shared sections, the templates; the mesh."""
    check_unknown_fields(config, dail_config_lib.dail_config(), kind="a DAIL", where="opdjax/dail/config.py")
    check_shared(config)
    try:
        check_templates(config.prompts)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    return check_mesh(config.mesh, num_devices)


def validate_dail_train(config, *, num_devices: int | None = None) -> ModelConfig:
    """job=dail_train: checks that need no weights; returns M's ModelConfig (from config.json)."""
    n_dev = jax.device_count() if num_devices is None else num_devices
    mesh_shape = check_dail_shared(config, n_dev)
    t = config.train
    if t.divergence not in contrastive.DIVERGENCES:
        raise ConfigError(f"config.train.divergence={t.divergence!r}: choose one of {', '.join(contrastive.DIVERGENCES)}.")
    if not t.gamma >= 0:
        raise ConfigError(f"config.train.gamma={t.gamma!r} must be >= 0 (0 = no negative term).")
    if not t.negative_clip >= 0:
        raise ConfigError(f"config.train.negative_clip={t.negative_clip!r} must be >= 0 (0 = no clip).")
    if config.loss.normalize not in losses.NORMALIZATIONS:
        raise ConfigError(f"config.loss.normalize={config.loss.normalize!r}: choose per_sequence (the mean over "
                          "each trace, then over the step's traces; the authors') or kept_tokens (one mean over "
                          "the step's response tokens).")
    check_positive_ints(t, "train", ("epochs",))
    check_positive_ints(config.batch, "batch", ("sequences_per_step",))
    check_batch_split(config.batch.sequences_per_step, "traces per step (batch.sequences_per_step)",
                      "sequences_per_step", config.batch.microbatches, mesh_shape)
    if config.lora.enabled:
        try:
            lora.LoraSpec.from_config(config.lora)
        except ValueError as e:
            raise ConfigError(str(e)) from e
    traces = dail_config_lib.traces_path(config)
    if missing_local_path(traces):
        raise ConfigError(f"config.train.traces={traces!r} does not exist; run the synthesis first "
                          "(job dail_synthesize) or point train.traces at a traces JSONL file.")
    cfg = model_cfg(config.model, "model", attention=config.model.attention)
    _check_dail_fits(config, cfg, n_dev, "dail_train")
    return cfg


def validate_dail_synthesis(config, *, num_devices: int | None = None) -> ModelConfig:
    """job=dail_synthesize: everything it reads, before any weights are loaded; returns M's
    ModelConfig (from config.json)."""
    n_dev = jax.device_count() if num_devices is None else num_devices
    check_dail_shared(config, n_dev)
    if not (_is_int(config.seed) and config.seed >= 0):
        raise ConfigError(f"config.seed={config.seed!r} must be an integer >= 0.")
    try:
        check_hint_config(config.hint)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    s, d = config.synthesis, config.data
    if not d.problems:
        raise ConfigError("config.data.problems is empty; give a .jsonl / .jsonl.gz / .parquet / "
                          "ArrayRecord file, a TFDS or save_to_disk directory, or tfds:NAME.")
    if missing_local_path(d.problems):
        raise ConfigError(f"config.data.problems={d.problems!r} does not exist.")
    if not _is_int(d.limit) or d.limit < 0:
        raise ConfigError(f"config.data.limit={d.limit!r} must be an integer >= 0 (0 = every problem).")
    if s.accept_threshold is not None and (
            not isinstance(s.accept_threshold, (int, float)) or isinstance(s.accept_threshold, bool)
            or not 0.0 <= float(s.accept_threshold) <= 1.0):
        raise ConfigError(f"config.synthesis.accept_threshold={s.accept_threshold!r} must be a number "
                          "in [0, 1] (0 = student only, 1 = expert only), or None for the recipe's "
                          "default (1.0 reasoning, 0.8 otherwise).")
    if s.selection not in dail_config_lib.SELECTIONS:
        raise ConfigError(f"config.synthesis.selection={s.selection!r}: choose one of "
                          f"{dail_config_lib.SELECTIONS} (auto = random for a reasoning recipe, graded otherwise).")
    if not isinstance(s.min_keep_rate, (int, float)) or isinstance(s.min_keep_rate, bool) \
            or not 0.0 <= float(s.min_keep_rate) <= 1.0:
        raise ConfigError(f"config.synthesis.min_keep_rate={s.min_keep_rate!r} must be a number in [0, 1] "
                          "(0 = no check).")
    check_positive_ints(s, "synthesis", ("num_samples", "problems_per_batch", "top_n", "retries"))
    if s.on_no_match not in dail_config_lib.ON_NO_MATCH:
        raise ConfigError(f"config.synthesis.on_no_match={s.on_no_match!r}: choose one of "
                          f"{dail_config_lib.ON_NO_MATCH}.")
    if isinstance(s.ban_tokens, str) or not all(isinstance(t, str) for t in s.ban_tokens):
        raise ConfigError(f"config.synthesis.ban_tokens={s.ban_tokens!r} must be a tuple of token "
                          "strings, e.g. ('</think>',).")
    out = dail_config_lib.output_path(config)
    if os.path.isdir(out):
        raise ConfigError(f"config.synthesis.output={out!r} is a directory; give a file path "
                          "(or '' for workdir/traces.jsonl).")
    try:
        cfg = model_cfg(config.model, "model", attention=config.model.attention)
    except ValueError as e:  # config.json problems from ModelConfig
        raise ConfigError(str(e)) from e
    if s.top_n > cfg.vocab_size:
        raise ConfigError(f"config.synthesis.top_n={s.top_n} exceeds the vocabulary of config.model "
                          f"({cfg.vocab_size}).")
    _check_dail_fits(config, cfg, n_dev, "dail_synthesize")
    return cfg


def _check_dail_fits(config, cfg, num_devices, job) -> None:
    """Refuses a config that cannot fit config.chip."""
    check_fits(estimate_dail_memory(config, cfg, num_devices=num_devices, job=job))
