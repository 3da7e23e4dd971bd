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
# No final answer and no landmarks (a proof in words): the authors then hint with an empty list.
HINT_TEXT_EMPTY = "Hint: the solution states no final answer and no intermediate results."


TOY_MODEL = os.path.join(os.path.dirname(opdjax.__file__), "assets", "toy_dail", "model")  # the embedded M
TOY_PROBLEMS = "tfds:opdjax_dail_toy/seed0"  # shipped; prepared in data.data_dir on first use
ON_NO_MATCH = ("skip", "random")  # synthesis.on_no_match choices
SELECTIONS = ("auto", "graded", "random")  # synthesis.selection choices (opdjax.dail.synthesize)
REFERENCE_CUTS = ("solution_marker", "none")  # prompts.reference_cut choices (opdjax.dail.prompts)
# tau per recipe when synthesis.accept_threshold is None. Authors' code: data_generation/conf/
# generate.yaml, prob_threshold_reasoning: 1.0 and prob_threshold_non_reasoning: 0.8.
TAU_REASONING, TAU_NON_REASONING = 1.0, 0.8


def accept_threshold_for(config, reasoning: bool | None = None) -> float:
    """tau: config.synthesis.accept_threshold, or (None) the authors' value for the recipe: 1.0 for
    a reasoning recipe, 0.8 otherwise. `reasoning` is what synthesis measures on the tokenizer
    (`opdjax.dail.synthesize.resolve_recipe`: thinking on and a chat template that thinks); without
    a tokenizer (None), config.prompts.enable_thinking alone decides."""
    tau = config.synthesis.accept_threshold
    if tau is not None:
        return float(tau)
    if reasoning is None:
        reasoning = bool(config.prompts.enable_thinking)
    return TAU_REASONING if reasoning else TAU_NON_REASONING


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
    # data.max_prompt_tokens: a longer rendered context (student, expert or hint) is an error, after
    # prompts.reference_cut. 16000: the authors' limit (generate.yaml max_seq_len: 16000).
    c.data = schema.data_section(max_prompt_tokens=16000)  # data_dir, answer_field, max_prompt_tokens
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
    # An expert context over data.max_prompt_tokens: "solution_marker" drops trailing solutions (at
    # the last "Solution N:" marker or list item, repeated) until it fits, logged and recorded per
    # trace (authors' code: build_expert_prompt); "none" = an error.
    c.prompts.reference_cut = "solution_marker"

    c.hint = ml_collections.ConfigDict()
    c.hint.text = HINT_TEXT
    c.hint.text_no_landmarks = HINT_TEXT_NO_LANDMARKS
    c.hint.text_no_answer = HINT_TEXT_NO_ANSWER
    c.hint.text_empty = HINT_TEXT_EMPTY
    c.hint.max_landmarks = 0  # 0 = every landmark (authors' code: form_cheating_hint lists them all)
    c.hint.order = "sorted"  # sorted | appearance; sorted by text as the authors' form_cheating_hint
    c.hint.max_expression_chars = 24

    # Step 1: the mixed rollout (DAIL.md). rollout.max_new_tokens is also the traces' length that
    # training's memory estimate assumes.
    c.rollout = schema.rollout_section(max_new_tokens=256)  # max_new_tokens, cache_dtype
    c.synthesis = ml_collections.ConfigDict()
    c.synthesis.output = ""  # "" = workdir/traces.jsonl; a re-run skips problems already in it
    # tau: 0 = student only, 1 = expert only ("direct"); None = per recipe (accept_threshold_for):
    # 1.0 reasoning (thinking on, template thinks), 0.8 otherwise (authors' generate.yaml).
    c.synthesis.accept_threshold = ml_collections.config_dict.placeholder(float)
    c.synthesis.top_n = 20  # P and V are the top-20 distributions of the two contexts
    c.synthesis.retries = 5  # draws from P before the expert takes over
    c.synthesis.num_samples = 32  # traces drawn per problem; one is kept
    c.synthesis.ban_tokens = ("</think>",)  # never generated during synthesis (tokens not in the vocab are ignored)
    c.synthesis.problems_per_batch = 1  # rows per jitted call = problems_per_batch * num_samples
    c.synthesis.on_no_match = "skip"  # graded, a checkable problem none of whose traces matches: skip | random
    # Which trace is kept: graded (first answer match) | random (seeded) | auto: random for a
    # reasoning recipe (its traces are thinking prefixes: </think> banned, no answer to grade),
    # graded otherwise; authors' code: grade_and_save.py skips grading for reasoning runs and
    # extract_final_dataset.py keeps one random trace of each problem. No answer: always random.
    c.synthesis.selection = "auto"
    # Kept / problems below this is an error naming the rate and its likely cause (checked after
    # every batch from 32 problems on, and at the end); ours: 0.1 (0 = off).
    c.synthesis.min_keep_rate = 0.1

    # Step 2: contrastive distillation.
    c.train = ml_collections.ConfigDict()
    c.train.traces = ""  # "" = the synthesis output; or any data-layer source (e.g. tfds:NAME prepared from it)
    c.train.traces_split = ""  # its split, TFDS syntax ("" = the only one, else "train")
    # The traces' rendering settings (<traces>.settings.json, written by synthesis: prompts.*, the
    # tokenizer's sha256) must equal the training config's; a mismatch is always an error. Traces
    # without that file (an older synthesis, a dataset prepared from them): True = an error, False =
    # a loud warning and training unchecked. ours: an error, since mismatched contexts train silently.
    c.train.require_context_settings = True
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
    # per_sequence: the mean over each trace's response tokens, then over the step's traces (authors'
    # code: train/dail_train.py, kl_div(reduction="batchmean") over one sequence's response tokens per
    # device batch of 1, averaged over accumulation and devices); kept_tokens (= all_response_tokens
    # here): one mean over all the step's response tokens, which weighs long traces more.
    c.loss.normalize = "per_sequence"

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
    # Subtracted from the logit of every token a sample has already generated (vLLM's presence_penalty,
    # before temperature / top-p; 0 = off). authors' code: eval/eval.py, SamplingParams(presence_penalty=1.5).
    c.eval.presence_penalty = 1.5
    # Token budgets, each its own pass@k curve (opdjax.eval.budget; authors' code: eval/eval.py). Thinking
    # on (prompts.enable_thinking): up to `budget` tokens of thinking (generation stops at thinking_end,
    # counted), then EVERY sample gets forced_answer and up to answer_tokens more. Thinking off: the
    # budget bounds the whole response; the samples without an answer the grader finds are forced.
    c.eval.budgets = (512,)
    c.eval.thinking_end = "</think>"  # Qwen3's end-of-thinking token (read with thinking on)
    c.eval.forced_answer = "\n</think>\n\nThe final answer is \\boxed{"  # ours (the authors' cue differs in wording)
    c.eval.answer_tokens = 100  # authors' evaluation: the forced answer continues up to 100 tokens
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
    c.hint.order = "appearance"  # as the toy model's hints were written (dail_problems.hint_landmarks)
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
