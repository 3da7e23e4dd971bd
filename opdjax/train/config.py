"""The OPD training config: every section with its default, in the order the data flows.

Config files (configs/*.py) start from `opd_config()` and change what they need; `launch/tpu_run.py`
applies dotted command-line overrides on top. `opdjax.train.validate.validate_config` checks the
whole thing (names, ranges, paths, mesh vs devices, batch divisibility, tokenizer agreement)
before anything is compiled.
"""
from __future__ import annotations

import ml_collections

from opdjax.aot.config import compile_section

from opdjax.teachability.rule import release_config


def model_section(path: str = "", dtype: str = "float32") -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    m.path = path  # Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer files)
    m.gguf = ""  # or a GGUF file (qwen2/qwen3); converted on load
    m.dtype = dtype  # float32 | bfloat16 (params; logits and losses are always float32)
    return m


def optimizer_section(learning_rate: float = 1e-5, schedule: str = "constant", warmup_steps: int = 0,
                      weight_decay: float = 0.0) -> ml_collections.ConfigDict:
    """AdamW after global-norm clipping (opdjax.train.step.make_optimizer reads it)."""
    o = ml_collections.ConfigDict()
    o.learning_rate = learning_rate
    o.schedule = schedule  # constant | cosine | linear (all after linear warmup)
    o.warmup_steps = warmup_steps
    o.b1 = 0.9
    o.b2 = 0.999
    o.eps = 1e-8
    o.weight_decay = weight_decay
    o.grad_clip = 1.0  # global-norm clipping; 0 = off
    return o


def opd_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.job = "opd"
    c.workdir = "runs/opd"
    c.seed = 0

    # Models. The student is trained; the teacher is frozen and may live in a lower precision.
    c.student = model_section()
    c.teacher = model_section()
    # How both models attend in full-sequence forwards (teacher scoring, the train step's forward
    # and backward; sampling always decodes with XLA): auto | xla | splash | cudnn. auto = splash
    # (Pallas kernel) on TPU, cudnn on GPU for bfloat16 params, xla otherwise (opdjax.models.attention).
    c.model = ml_collections.ConfigDict()
    c.model.attention = "auto"
    # Teacher and student must share tokenizer and chat template (checked before step 0).
    # chat_template: "" = they must agree exactly; "student" | "teacher" = render every prompt with
    # that model's template for both (for pairs whose templates differ only in unused branches).
    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.chat_template = ""

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (1, -1, 1)  # (data, fsdp, tensor); -1 fills with the remaining devices
    # accelerator the memory estimate is checked against (opdjax.train.memory.CHIPS): cpu | v4 |
    # v5e | v5p | v6e | h100 | h200. "cpu" skips the check.
    c.chip = "cpu"
    c.compile = compile_section()  # job=compile: every phase compiled for a TPU topology (opdjax.aot)

    # Prompts. A JSONL or Parquet file with one problem per record; `answer_field` is optional
    # ("" = no grading). task="toy_arithmetic" generates the embedded demo task instead of files.
    c.data = ml_collections.ConfigDict()
    # Sources (opdjax.data.sources): a .jsonl(.gz) / .parquet / ArrayRecord file (or glob), a TFDS
    # or save_to_disk directory, or "tfds:NAME" under data_dir; local or gs://. Splits in TFDS
    # syntax ("train[:90%]"), for every kind of source.
    c.data.task = ""  # "" (read train_file/eval_file) | "toy_arithmetic" (tfds:opdjax_toy_arithmetic/seed<seed>)
    c.data.train_file = ""
    c.data.train_split = "train"  # a single file has one split: the name is a label, the slice applies
    c.data.eval_file = ""
    c.data.eval_split = ""  # "" = the only split, else "test"
    c.data.data_dir = ""  # TFDS data_dir for tfds:NAME; "" = $TFDS_DATA_DIR or ~/tensorflow_datasets
    c.data.prompt_field = "prompt"
    c.data.answer_field = "answer"
    c.data.system_prompt = ""
    c.data.enable_thinking = False  # Qwen3 chat templates: thinking mode switch
    c.data.max_prompt_tokens = 256  # a longer prompt is an error naming the record, never cut
    c.data.shuffle = True  # reshuffled each epoch with the run's seed (part of the checkpoint)
    c.data.trace_reads = False  # write workdir/data_reads/process_<i>.jsonl: the records each process read per step
    c.data.num_train = 2048  # task=toy_arithmetic only: generated problems
    c.data.num_eval = 64

    # Rollouts from the current student.
    c.rollout = ml_collections.ConfigDict()
    c.rollout.samples_per_prompt = 4
    c.rollout.max_new_tokens = 128
    c.rollout.temperature = 1.0
    c.rollout.top_p = 1.0
    c.rollout.top_k = 0  # 0 = off
    c.rollout.cache_dtype = ""  # sampler KV cache: "" = the student's param dtype | bfloat16 | float32
    c.rollout.stop_tokens = ()  # extra stop ids; the tokenizer's EOS always stops
    # which student log-prob is pi_old in the loss and in A_t: "sampled" = the distribution actually
    # sampled from (after temperature / top-p / top-k), "model" = the student's own softmax.
    c.rollout.old_logp = "sampled"

    c.batch = ml_collections.ConfigDict()
    c.batch.prompts_per_step = 8  # rollouts per step = prompts_per_step * samples_per_prompt
    c.batch.microbatches = 1  # gradient accumulation: the rollout batch is split this many ways

    c.release = release_config()

    c.loss = ml_collections.ConfigDict()
    c.loss.name = "pg"  # pg | reverse_kl_topk | reverse_kl_full | forward_kl_full | jsd
    c.loss.normalize = "kept_tokens"  # kept_tokens | all_response_tokens | per_sequence
    c.loss.clip_eps = 0.2  # pg: importance-ratio clip
    c.loss.jsd_beta = 0.5  # jsd: mixture weight
    c.loss.chunk_tokens = 256  # full-vocabulary losses: positions per chunk (no [B,T,V] in float32)

    c.optimizer = optimizer_section()

    c.train = ml_collections.ConfigDict()
    c.train.steps = 100

    c.eval = ml_collections.ConfigDict()
    c.eval.before = True  # evaluate the untrained student at step 0 (fresh runs only)
    c.eval.every = 0  # steps; 0 = only before and after training
    c.eval.num_problems = 64  # from data.eval_file (or the generated held-out set)
    c.eval.samples = 4  # n per problem; pass@k for every k in eval.k <= n (unbiased estimator)
    c.eval.k = (1, 4)
    c.eval.temperature = 1.0
    c.eval.greedy = True  # also report greedy accuracy
    c.eval.max_new_tokens = 128

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.directory = ""  # "" = workdir/checkpoints; any path orbax can write (gs://... on a pod)
    c.checkpoint.every = 50  # steps; 0 = only at the end (and on SIGTERM)
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True
    c.checkpoint.export_hf = True  # the final student as a Hugging Face checkpoint in workdir/student_hf

    c.metrics = ml_collections.ConfigDict()
    c.metrics.tensorboard = True
    c.metrics.pictures_every = 10  # release-rule pictures every N steps; 0 = off
    c.metrics.pictures_per_step = 2  # trajectories drawn each time
    c.metrics.progress = True  # progress bar with tokens/s and ETA

    # job=opd_compare only: one OPD run per arm from the same student, same data and seed,
    # differing only in release.mode; then a side-by-side report.
    c.compare = ml_collections.ConfigDict()
    c.compare.arms = ("bic", "full")

    # job=diagnose only (opdjax.train.diagnose): is local teachability collapse there at all?
    # Student rollouts on the first `num_prompts` prompts of data (rollout.samples_per_prompt
    # each, batch.prompts_per_step per call), teacher scores, and the release rule with every
    # margin variant under both calibrations (release.permutations, release.alpha); no update.
    c.diagnose = ml_collections.ConfigDict()
    c.diagnose.num_prompts = 16  # 0 = every prompt of data.train_file (or data.num_train toy problems)
    c.diagnose.variants = ("advantage_gap", "teacher_gap", "sampled_margin", "renorm_prob_gap")
    c.diagnose.significance = 0.01  # level of the verdict's tests
    c.diagnose.examples = 3  # trajectories drawn per variant in the report
    c.diagnose.directory = ""  # "" = workdir/diagnosis
    # a saved arrays.npz (from an earlier diagnosis): redo the statistics with this config's
    # release settings (penalty, variance, min_segment, alpha, permutations...) in seconds,
    # without sampling or scoring again. Its rollouts were made by the models it was made with.
    c.diagnose.arrays = ""
    return c
