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

import ml_collections

from opdjax.aot.config import compile_section

from opdjax.train.config import model_section, optimizer_section

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


def dail_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.job = "dail_synthesize"
    c.workdir = "runs/dail"
    c.seed = 0

    c.model = model_section()  # M: synthesises, is the frozen reference, and is trained
    # Full-sequence forwards (scoring, training; decoding is always XLA): auto | xla | splash | cudnn.
    # auto = splash on TPU, cudnn on GPU for bfloat16 params, xla otherwise (opdjax.models.attention).
    c.model.attention = "auto"
    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (1, -1, 1)  # (data, fsdp, tensor)
    c.chip = "cpu"  # memory estimate checked against this chip (opdjax.train.memory.CHIPS)
    c.compile = compile_section()  # job=compile: every phase compiled for a TPU topology (opdjax.aot)

    # Problems with expert solutions, from any source opdjax.data.sources opens: a .jsonl(.gz) /
    # .parquet / ArrayRecord file, a TFDS or save_to_disk directory, or "tfds:NAME" under data_dir;
    # local or gs://. data.split in TFDS syntax ("train[:90%]").
    c.data = ml_collections.ConfigDict()
    c.data.problems = ""
    c.data.split = "train"
    c.data.id_field = ""  # "" = the record's position in the file
    c.data.problem_field = "problem"
    c.data.solution_field = "solution"  # a string, or a list of strings (several expert solutions)
    c.data.answer_field = "answer"  # "" or a missing/empty value: no checkable answer for that problem
    c.data.limit = 0  # 0 = every problem
    c.data.data_dir = ""  # TFDS data_dir for tfds:NAME sources; "" = $TFDS_DATA_DIR or ~/tensorflow_datasets

    # Prompts of the three contexts, rendered as one user turn with the checkpoint's chat template.
    c.prompts = ml_collections.ConfigDict()
    c.prompts.student = STUDENT_TEMPLATE
    c.prompts.expert = EXPERT_TEMPLATE
    c.prompts.hint = HINT_TEMPLATE
    c.prompts.system = ""  # a system turn before each, "" = none
    c.prompts.enable_thinking = True  # Qwen3: thinking mode on (templates without the switch ignore it)
    c.prompts.max_prompt_tokens = 2048  # a longer rendered context is an error naming the record
    c.prompts.solution_separator = "\n\n---\n\n"  # between several expert solutions of one problem

    c.hint = ml_collections.ConfigDict()
    c.hint.text = HINT_TEXT
    c.hint.text_no_landmarks = HINT_TEXT_NO_LANDMARKS
    c.hint.text_no_answer = HINT_TEXT_NO_ANSWER
    c.hint.max_landmarks = 8
    c.hint.max_expression_chars = 24

    # Step 1: the mixed rollout (DAIL.md).
    c.synthesis = ml_collections.ConfigDict()
    c.synthesis.output = ""  # "" = workdir/traces.jsonl; a re-run skips problems already in it
    c.synthesis.accept_threshold = 0.5  # tau: 0 = student only, 1 = expert only ("direct")
    c.synthesis.top_n = 20  # P and V are the top-20 distributions of the two contexts
    c.synthesis.retries = 5  # draws from P before the expert takes over
    c.synthesis.num_samples = 32  # traces drawn per problem; one is kept
    c.synthesis.max_new_tokens = 256
    c.synthesis.ban_tokens = ("</think>",)  # never generated during synthesis (tokens not in the vocab are ignored)
    c.synthesis.problems_per_batch = 1  # rows per jitted call = problems_per_batch * num_samples
    c.synthesis.on_no_match = "skip"  # a checkable problem none of whose traces matches: skip | random
    c.synthesis.cache_dtype = ""  # "" = the params' dtype | bfloat16 | float32

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
    c.train.sequences_per_step = 16
    c.train.microbatches = 1
    c.train.chunk_tokens = 256  # response positions per full-vocabulary chunk
    c.train.max_response_tokens = 0  # 0 = the longest trace; a longer trace is an error naming it
    c.train.remat = True

    # LoRA (train.full_finetune=False): the reference is the base with the adapter off.
    c.lora = ml_collections.ConfigDict()
    c.lora.enabled = True  # False = full fine-tuning against a frozen copy of M
    c.lora.rank = 32
    c.lora.alpha = 32.0
    c.lora.targets = ("q", "k", "v", "o", "gate", "up", "down")

    c.optimizer = optimizer_section(learning_rate=2e-4, schedule="linear", warmup_steps=5, weight_decay=0.01)

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

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.directory = ""
    c.checkpoint.every = 50
    c.checkpoint.keep = 2
    c.checkpoint.async_save = True
    c.checkpoint.export_hf = True  # merged (LoRA folded into the base) student in workdir/student_hf

    c.metrics = ml_collections.ConfigDict()
    c.metrics.tensorboard = True
    c.metrics.progress = True
    return c
