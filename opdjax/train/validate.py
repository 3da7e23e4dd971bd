"""Check a whole OPD config before anything is loaded onto a device or compiled.

Every message names the config field (as it would be written on the command line) and says
what to do. Checks that need the checkpoints read only their small files (config.json,
tokenizer files); the weights are loaded after this passes.
"""
from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections

from opdjax import losses
from opdjax.models import attention as attention_lib
from opdjax.models.config import ModelConfig
from opdjax.teachability.rule import ReleaseSettings, settings_from_config
from opdjax.train.config import opd_config
from opdjax.data.sources import missing_local_path


class ConfigError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class CheckedConfig:
    """What validation resolved: model configs (from config.json), release settings, sizes."""
    student_cfg: ModelConfig
    teacher_cfg: ModelConfig
    release: ReleaseSettings
    rollout_rows: int  # prompts_per_step * samples_per_prompt
    mesh_shape: tuple[int, int, int]


def check_unknown_fields(c, schema, prefix="", *, kind="an OPD", where="opdjax/train/config.py"):
    """Every field of `c` must exist in `schema` (a typo is an error, never silently ignored)."""
    for k in c.keys():
        name = f"{prefix}{k}"
        if k not in schema:
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
        from opdjax.models import gguf_io
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
        from opdjax.models import gguf_io
        return gguf_io.load_gguf_tokenizer(section.gguf)
    from opdjax.data.tokenizer import load_tokenizer
    try:
        return load_tokenizer(section.path)
    except Exception as e:  # noqa: BLE001 - re-raised with the field name
        raise ConfigError(f"config.{name}.path={section.path!r}: cannot load its tokenizer ({e}).") from e


def check_tokenizers(c, student_tok, teacher_tok) -> None:
    from opdjax.data.tokenizer import TokenizerMismatchError, check_same_tokenizer
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
    check_attention(c.model.attention)
    if c.loss.name not in losses.LOSSES:
        raise ConfigError(f"config.loss.name={c.loss.name!r} is unknown; choose one of {', '.join(losses.LOSSES)}.")
    if c.loss.normalize not in losses.NORMALIZATIONS:
        raise ConfigError(f"config.loss.normalize={c.loss.normalize!r}: choose one of "
                          f"{', '.join(losses.NORMALIZATIONS)}.")
    if not c.loss.clip_eps > 0:
        raise ConfigError(f"config.loss.clip_eps={c.loss.clip_eps!r} must be > 0.")
    if not 0.0 <= c.loss.jsd_beta <= 1.0:
        raise ConfigError(f"config.loss.jsd_beta={c.loss.jsd_beta!r} must lie in [0, 1].")
    if not (isinstance(c.loss.chunk_tokens, int) and c.loss.chunk_tokens >= 1):
        raise ConfigError(f"config.loss.chunk_tokens={c.loss.chunk_tokens!r} must be an integer >= 1.")
    try:
        release = settings_from_config(c.release)
    except ValueError as e:
        raise ConfigError(f"config.{e}") from e
    if c.rollout.old_logp not in ("sampled", "model"):
        raise ConfigError(f"config.rollout.old_logp={c.rollout.old_logp!r}: choose 'sampled' (the distribution "
                          "sampled from) or 'model' (the student's softmax).")
    for name in ("samples_per_prompt", "max_new_tokens"):
        v = c.rollout[name]
        if not (isinstance(v, int) and v >= 1):
            raise ConfigError(f"config.rollout.{name}={v!r} must be an integer >= 1.")
    for name in ("prompts_per_step", "microbatches"):
        v = c.batch[name]
        if not (isinstance(v, int) and v >= 1):
            raise ConfigError(f"config.batch.{name}={v!r} must be an integer >= 1.")
    if not (isinstance(c.train.steps, int) and c.train.steps >= 1):
        raise ConfigError(f"config.train.steps={c.train.steps!r} must be an integer >= 1.")
    check_optimizer(c.optimizer)
    e = c.eval
    if not (isinstance(e.samples, int) and e.samples >= 1):
        raise ConfigError(f"config.eval.samples={e.samples!r} must be an integer >= 1.")
    for k in e.k:
        if not (isinstance(k, int) and 1 <= k <= e.samples):
            raise ConfigError(f"config.eval.k contains {k!r}: every k must be in [1, eval.samples={e.samples}] "
                              "(pass@k needs n >= k samples per problem); raise eval.samples or drop that k.")
    if c.checkpoint.keep < 1:
        raise ConfigError(f"config.checkpoint.keep={c.checkpoint.keep!r} must be >= 1.")

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

    # Mesh and batch divisibility.
    from opdjax.sharding import ShardingError, mesh_shape_from_config
    n_dev = jax.device_count() if num_devices is None else num_devices
    try:
        mesh_shape = mesh_shape_from_config(tuple(c.mesh.shape), n_dev, field="config.mesh.shape")
    except ShardingError as e:
        raise ConfigError(str(e)) from e
    rows = c.batch.prompts_per_step * c.rollout.samples_per_prompt
    shards = mesh_shape[0] * mesh_shape[1]
    m = c.batch.microbatches
    if rows % (m * shards):
        raise ConfigError(
            f"config.batch: {rows} rollout rows per step (batch.prompts_per_step={c.batch.prompts_per_step} x "
            f"rollout.samples_per_prompt={c.rollout.samples_per_prompt}) must be divisible by "
            f"batch.microbatches={m} x batch shards {shards} (mesh data x fsdp = {mesh_shape[0]} x "
            f"{mesh_shape[1]}); change prompts_per_step, samples_per_prompt, microbatches or mesh.shape.")

    # Tokenizers and chat template: the teacher must see the student's exact ids.
    student_tok, teacher_tok = tokenizers if tokenizers else (load_tokenizer_for(c.student, "student"),
                                                              load_tokenizer_for(c.teacher, "teacher"))
    check_tokenizers(c, student_tok, teacher_tok)

    if c.chip != "cpu":
        from opdjax.train import memory
        est = memory.estimate_memory(c, student_cfg, teacher_cfg, num_devices=n_dev, chip=c.chip)
        memory.check_fits(est, c, student_cfg, teacher_cfg)
    return CheckedConfig(student_cfg, teacher_cfg, release, rows, mesh_shape)
