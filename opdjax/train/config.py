"""The OPD training config: every section with its default, in the order the data flows.

Config files (configs/*.py) start from `opd_config()` and change what they need; `launch/tpu_run.py`
applies dotted command-line overrides on top. `opdjax.train.validate.validate_config` checks the
whole thing (names, ranges, paths, mesh vs devices, batch divisibility, tokenizer agreement)
before anything is compiled.
"""
from __future__ import annotations

import os

import ml_collections

import opdjax
from opdjax import schema
from opdjax.teachability.rule import release_config


TOY_PAIR = os.path.join(os.path.dirname(opdjax.__file__), "assets", "toy_pair")  # the embedded teacher/student


def opd_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    schema.common(c, job="opd", workdir="runs/opd")  # job, workdir, seed, chip, mesh, compile

    # Models. The student is trained; the teacher is frozen and may live in a lower precision.
    c.student = schema.model_role()
    c.teacher = schema.model_role()
    c.model = ml_collections.ConfigDict()
    c.model.attention = schema.ATTENTION  # both models' full-sequence forwards (see opdjax.schema)
    # Teacher and student must share tokenizer and chat template (checked before step 0).
    # chat_template: "" = they must agree exactly; "student" | "teacher" = render every prompt with
    # that model's template for both (for pairs whose templates differ only in unused branches).
    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.chat_template = ""

    # Prompts. A JSONL or Parquet file with one problem per record; `answer_field` is optional
    # ("" = no grading). task="toy_arithmetic" generates the embedded demo task instead of files.
    # Splits in TFDS syntax ("train[:90%]"), for every kind of source.
    c.data = schema.data_section(max_prompt_tokens=256)  # data_dir, answer_field, max_prompt_tokens
    c.data.task = ""  # "" (read train_file/eval_file) | "toy_arithmetic" (tfds:opdjax_toy_arithmetic/seed<seed>)
    c.data.train_file = ""
    c.data.train_split = "train"  # a single file has one split: the name is a label, the slice applies
    c.data.eval_file = ""
    c.data.eval_split = ""  # "" = the only split, else "test"
    c.data.prompt_field = "prompt"
    c.data.system_prompt = ""
    c.data.enable_thinking = False  # Qwen3 chat templates: thinking mode switch
    c.data.shuffle = True  # reshuffled each epoch with the run's seed (part of the checkpoint)
    c.data.trace_reads = False  # write workdir/data_reads/process_<i>.jsonl: the records each process read per step
    c.data.num_train = 2048  # task=toy_arithmetic only: generated problems
    c.data.num_eval = 64

    # Rollouts from the current student.
    c.rollout = schema.rollout_section(max_new_tokens=128)  # max_new_tokens, cache_dtype
    c.rollout.samples_per_prompt = 4
    c.rollout.temperature = 1.0
    c.rollout.top_p = 1.0
    c.rollout.top_k = 0  # 0 = off
    c.rollout.stop_tokens = ()  # extra stop ids; the tokenizer's EOS always stops
    # which student policy the loss trains, as pi_old, in A_t and as pi_theta in the step: "sampled" =
    # the distribution actually sampled from (after temperature / top-k / top-p; the step applies the
    # same transform to pi_theta, so rho = 1 on-policy), "model" = the student's own softmax (then
    # tempered / truncated rollouts are off-policy samples of it, without importance correction).
    c.rollout.old_logp = "sampled"

    c.batch = schema.batch_section()  # microbatches
    c.batch.prompts_per_step = 8  # rollouts per step = prompts_per_step * samples_per_prompt

    c.release = release_config()

    c.loss = schema.loss_section()  # chunk_tokens
    c.loss.name = "pg"  # pg | reverse_kl_topk | reverse_kl_full | forward_kl_full | jsd
    c.loss.normalize = "kept_tokens"  # kept_tokens | all_response_tokens | per_sequence
    c.loss.clip_eps = 0.2  # pg: importance-ratio clip
    c.loss.jsd_beta = 0.5  # jsd: mixture weight

    c.optimizer = schema.optimizer_section()

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

    c.checkpoint = schema.checkpoint_section(keep=3)

    c.metrics = schema.metrics_section()  # tensorboard, progress
    c.metrics.pictures_every = 10  # release-rule pictures every N steps; 0 = off
    c.metrics.pictures_per_step = 2  # trajectories drawn each time

    # job=opd_compare only: one OPD run per arm from the same student, same data and seed,
    # differing only in release.mode; then a side-by-side report.
    c.compare = ml_collections.ConfigDict()
    c.compare.arms = ("bic", "full")
    # () = one run at config.seed in workdir/<arm>; (0, 1, ...) = every arm at every seed in
    # workdir/seed<N>/<arm> (data order, rollouts, eval draws and the toy task's problems follow the
    # seed; the starting student is the same), reported with paired-bootstrap intervals.
    c.compare.seeds = ()
    # ours: run the diagnose job first (this config's diagnose section, in workdir/diagnosis;
    # reused when it is there with the same settings) and train every arm with its recommended
    # release.margin / release.calibration (release.from_diagnosis). False = as configured.
    c.compare.diagnose_first = False

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


def runlocal(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A real-scale OPD config shrunk to a CPU check of its own job on the embedded toy pair: the
    same sections and settings where they fit a toy, tiny batches, two steps (`:runlocal`)."""
    c.workdir += "_runlocal"
    c.chip = "cpu"  # no memory check against the real chip
    c.mesh.shape = (1, -1, 1)
    c.student.path, c.student.gguf = os.path.join(TOY_PAIR, "student"), ""
    c.teacher.path, c.teacher.gguf = os.path.join(TOY_PAIR, "teacher"), ""
    c.teacher.dtype = "float32"
    c.tokenizer.chat_template = ""
    c.data.task = "toy_arithmetic"  # the pair's own task: no data files
    c.data.num_train, c.data.num_eval = 16, 8
    c.data.system_prompt, c.data.enable_thinking = "", False  # the toy pair's prompt format
    c.data.max_prompt_tokens = 96
    c.rollout.samples_per_prompt = 2
    c.rollout.max_new_tokens = 24
    c.batch.prompts_per_step = 2
    c.batch.microbatches = min(c.batch.microbatches, 2)  # keeps accumulation when the real config has it
    c.release.top_k = min(c.release.top_k, 8)
    c.loss.chunk_tokens = 16
    c.train.steps = 2
    c.eval.every = 0
    c.eval.num_problems = 4
    c.eval.samples = 2
    c.eval.k = (1, 2)
    c.eval.max_new_tokens = 24
    c.checkpoint.every = 1
    c.checkpoint.directory = ""
    c.metrics.pictures_every = 2
    c.metrics.tensorboard = False
    c.metrics.progress = False
    c.diagnose.num_prompts = 2
    c.release.permutations = min(c.release.permutations, 20)
    return c
