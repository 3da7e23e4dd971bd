"""The DAIL config: one schema for its jobs (synthesis, contrastive training, evaluation and the
embedded demo that runs all three), every section with its default.

    config.job = dail_synthesize   problems + expert solutions -> traces.jsonl  (step 1)
               | dail_train        traces.jsonl -> trained student (LoRA or full)  (step 2)
               | dail_eval         pass@k curves, base vs trained
               | dail_demo         the three in a row on the embedded toy model, with a report

Specification: ../shared/design/DAIL.md. The model section is M, the student's initial weights:
it synthesises the traces, is the frozen reference of both KL terms, and is what gets trained.
"""
from __future__ import annotations

import os

import ml_collections

import opdjax
from opdjax import schema
from opdjax.toy import dail_problems

# The three contexts, written for opdjax (templates, not code). Placeholders are replaced by plain
# substitution, never str.format, so braces in LaTeX problems are safe:
#   {problem}  the problem text;  {solution}  the expert solution(s);  {hint}  the landmarks hint.
STUDENT_TEMPLATE = (
    "{problem}\n\n"
    "Work through the problem step by step, then give the final answer as \\boxed{answer}."
)
EXPERT_TEMPLATE = (
    "{problem}\n\n"
    "Below is a reference solution written by an expert. It is for your eyes only.\n"
    "<reference>\n{solution}\n</reference>\n\n"
    "Now write your own solution as if you had never seen the reference. Do not mention or quote "
    "it, do not say you were given one, and do not jump ahead to its conclusions: derive every "
    "intermediate result yourself, from scratch, in the order you would find it. Work through the "
    "problem step by step, then give the final answer as \\boxed{answer}."
)
HINT_TEMPLATE = (
    "{problem}\n\n"
    "{hint}\n\n"
    "Work through the problem step by step, then give the final answer as \\boxed{answer}."
)
# The landmarks hint h(s) (opdjax.dail.hints): {answer} and {landmarks} are filled in.
HINT_TEXT = "Hint: the final answer is {answer}; intermediate results might include {landmarks}."
HINT_TEXT_NO_LANDMARKS = "Hint: the final answer is {answer}."
HINT_TEXT_NO_ANSWER = "Hint: intermediate results might include {landmarks}."  # proofs: no final answer


TOY_MODEL = os.path.join(os.path.dirname(opdjax.__file__), "assets", "toy_dail", "model")  # the embedded M
TOY_PROBLEMS = "tfds:opdjax_dail_toy/seed0"  # shipped; prepared in data.data_dir on first use
ON_NO_MATCH = ("skip", "random")  # synthesis.on_no_match choices


def output_path(config) -> str:
    """Where synthesis writes its traces."""
    return config.synthesis.output or os.path.join(config.workdir, "traces.jsonl")


def traces_path(config) -> str:
    """Where training reads its traces: train.traces, else the synthesis output."""
    return config.train.traces or output_path(config)


def dail_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    schema.common(c, job="dail_synthesize", workdir="runs/dail")  # job, workdir, seed, chip, mesh, compile

    c.model = schema.model_role()  # M: synthesises, is the frozen reference, and is trained
    c.model.attention = schema.ATTENTION  # full-sequence forwards (see opdjax.schema)

    # Problems with expert solutions; data.split in TFDS syntax ("train[:90%]").
    # data.max_prompt_tokens: a longer rendered context (student, expert or hint) is an error.
    c.data = schema.data_section(max_prompt_tokens=2048)  # data_dir, answer_field, max_prompt_tokens
    c.data.problems = ""
    c.data.split = "train"
    c.data.id_field = ""  # "" = the record's position in the file
    c.data.problem_field = "problem"
    c.data.solution_field = "solution"  # a string, or a list of strings (several expert solutions)
    c.data.limit = 0  # 0 = every problem
    # data.answer_field: "" or a record's missing/empty value = no checkable answer for that problem

    # Prompts of the three contexts, rendered as one user turn with the checkpoint's chat template.
    c.prompts = ml_collections.ConfigDict()
    c.prompts.student = STUDENT_TEMPLATE
    c.prompts.expert = EXPERT_TEMPLATE
    c.prompts.hint = HINT_TEMPLATE
    c.prompts.system = ""  # a system turn before each, "" = none
    c.prompts.enable_thinking = True  # Qwen3: thinking mode on (templates without the switch ignore it)
    c.prompts.solution_separator = "\n\n---\n\n"  # between several expert solutions of one problem

    c.hint = ml_collections.ConfigDict()
    c.hint.text = HINT_TEXT
    c.hint.text_no_landmarks = HINT_TEXT_NO_LANDMARKS
    c.hint.text_no_answer = HINT_TEXT_NO_ANSWER
    c.hint.max_landmarks = 8
    c.hint.max_expression_chars = 24

    # Step 1: the mixed rollout (DAIL.md). rollout.max_new_tokens is also the traces' length that
    # training's memory estimate assumes.
    c.rollout = schema.rollout_section(max_new_tokens=256)  # max_new_tokens, cache_dtype
    c.synthesis = ml_collections.ConfigDict()
    c.synthesis.output = ""  # "" = workdir/traces.jsonl; a re-run skips problems already in it
    c.synthesis.accept_threshold = 0.5  # tau: 0 = student only, 1 = expert only ("direct")
    c.synthesis.top_n = 20  # P and V are the top-20 distributions of the two contexts
    c.synthesis.retries = 5  # draws from P before the expert takes over
    c.synthesis.num_samples = 32  # traces drawn per problem; one is kept
    c.synthesis.ban_tokens = ("</think>",)  # never generated during synthesis (tokens not in the vocab are ignored)
    c.synthesis.problems_per_batch = 1  # rows per jitted call = problems_per_batch * num_samples
    c.synthesis.on_no_match = "skip"  # a checkable problem none of whose traces matches: skip | random

    # Step 2: contrastive distillation.
    c.train = ml_collections.ConfigDict()
    c.train.traces = ""  # "" = the synthesis output; or any data-layer source (e.g. tfds:NAME prepared from it)
    c.train.traces_split = ""  # its split, TFDS syntax ("" = the only one, else "train")
    c.train.gamma = 0.1  # weight of the negative (hint-context) KL term
    c.train.divergence = "reverse"  # reverse: KL(student || ref) | forward: KL(ref || student)
    # Guard on the negative term (unbounded below in principle): per token, min(KL_neg, clip)
    # enters the loss, so a token already far from the hint context is not pushed further.
    c.train.negative_clip = 10.0  # nats; 0 = no clip
    c.train.negative_alarm = 5.0  # warn (and count) when a step's mean negative KL exceeds this; 0 = off
    c.train.epochs = 3
    c.train.max_response_tokens = 0  # 0 = the longest trace; a longer trace is an error naming it
    c.train.remat = True

    c.batch = schema.batch_section()  # microbatches
    c.batch.sequences_per_step = 16  # traces per optimizer step
    c.loss = schema.loss_section()  # chunk_tokens: response positions per full-vocabulary chunk

    # LoRA (lora.enabled): the reference is the base with the adapter off.
    c.lora = ml_collections.ConfigDict()
    c.lora.enabled = True  # False = full fine-tuning against a frozen copy of M
    c.lora.rank = 32
    c.lora.alpha = 32.0
    c.lora.targets = ("q", "k", "v", "o", "gate", "up", "down")

    c.optimizer = schema.optimizer_section(learning_rate=2e-4, schedule="linear", warmup_steps=5, weight_decay=0.01)

    # Evaluation: pass@k for k = 1..samples, base vs trained.
    c.eval = ml_collections.ConfigDict()
    c.eval.problems = ""  # "" = no evaluation; same formats as data.problems
    c.eval.kind = "math"  # math (answer_field, math-verify) | choice (GPQA-style multiple choice)
    c.eval.problem_field = "problem"
    c.eval.answer_field = "answer"
    c.eval.choices_field = "choices"  # kind=choice: a list of options; answer_field = the correct one
    c.eval.choice_layout = "auto"  # choices (choices_field + answer) | gpqa ("Correct Answer", "Incorrect Answer 1..3") | auto
    c.eval.id_field = ""  # "" = the record's position
    c.eval.split = ""  # a save_to_disk DatasetDict's split ("" = its only split, or "test")
    c.eval.num_problems = 0  # 0 = all
    c.eval.samples = 8  # n per problem
    c.eval.temperature = 0.6
    c.eval.top_p = 0.95
    c.eval.budgets = (512,)  # thinking-token budgets; each gets its own pass@k curve
    # When a sample runs out of budget, this text is appended and answer_tokens more are generated.
    c.eval.forced_answer = "\n</think>\n\nThe final answer is \\boxed{"
    c.eval.answer_tokens = 32
    c.eval.rows_per_call = 64  # sampled rows per jitted call (memory: rows x (prompt + budget) KV cache)
    c.eval.prompt = "student"  # which template the evaluated model is prompted with
    c.eval.models = ()  # extra (name, path) pairs to compare; base and trained are always included

    # job=dail_demo only: how many embedded toy problems it reads (tfds:opdjax_dail_toy/seed<seed>,
    # train and eval splits) before running synthesis, training and evaluation on them.
    c.demo = ml_collections.ConfigDict()
    c.demo.num_problems = 48
    c.demo.num_eval_problems = 64

    c.checkpoint = schema.checkpoint_section(keep=2)  # export_hf: LoRA merged into the base
    c.metrics = schema.metrics_section()
    return c


def runlocal(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A real-scale DAIL config shrunk to a CPU check of its own job on the embedded toy model and
    problems (`:runlocal`): tiny batches, one epoch. A synthesis and a training config of one
    workdir still share it, so the training check reads the synthesis check's traces."""
    c.workdir += "_runlocal"
    c.chip = "cpu"  # no memory check against the real chip
    c.mesh.shape = (1, -1, 1)
    c.model.path, c.model.gguf, c.model.dtype = TOY_MODEL, "", "float32"
    c.data.problems, c.data.split, c.data.id_field = TOY_PROBLEMS, "train[:4]", "id"
    c.data.max_prompt_tokens = 256
    # The toy model's own prompt formats, thinking off, as it was trained.
    c.prompts.student, c.prompts.expert, c.prompts.hint = dail_problems.TOY_STUDENT, dail_problems.TOY_EXPERT, dail_problems.TOY_HINT
    c.prompts.enable_thinking = False
    c.hint.text, c.hint.text_no_landmarks = dail_problems.TOY_HINT_TEXT, dail_problems.TOY_HINT_TEXT_NO_LANDMARKS
    c.rollout.max_new_tokens = 32
    c.synthesis.num_samples = 2
    c.synthesis.problems_per_batch = 2
    c.synthesis.on_no_match = "random"  # a trace for every problem: the training check has data
    c.batch.sequences_per_step = 4
    c.batch.microbatches = min(c.batch.microbatches, 2)  # keeps accumulation when the real config has it
    c.loss.chunk_tokens = 16
    c.train.epochs = 1
    c.lora.rank, c.lora.alpha = 4, 8.0
    c.eval.problems, c.eval.split = TOY_PROBLEMS, "eval[:4]"
    c.eval.samples = 2
    c.eval.budgets = (32,)
    c.eval.forced_answer, c.eval.answer_tokens = " The answer is", 6
    c.eval.rows_per_call = 8
    c.checkpoint.every = 0
    c.metrics.tensorboard = False
    c.metrics.progress = False
    return c
