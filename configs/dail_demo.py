"""The DAIL embedded demo: synthesis + contrastive training + pass@k before/after, on the shipped
toy model M (opdjax/assets/toy_dail) and a few dozen toy arithmetic problems whose expert
solutions are terse ("didactic": steps skipped, opdjax.toy.dail_problems.terse_solution).

    python launch/tpu_run.py --config configs/dail_demo.py      # a few minutes on a 2-core CPU

Writes runs/dail_demo/: problems.jsonl and eval.jsonl (the toy problems), traces.jsonl (one kept
trace per problem, with its fallback rate), metrics.jsonl + curves.png (both KL terms),
student_hf/ (the LoRA merged into M) and adapter/ (PEFT format), eval/passk.{json,md,png}
(pass@k for k = 1..n, base vs trained, same sampling keys) and report.md.
"""
from opdjax.toy import dail_problems
from opdjax.dail.config import dail_config
from opdjax.toy.dail_model import load_toy_dail


def get_config(arg=None):
    del arg
    c = dail_config()
    c.job = "dail_demo"
    c.workdir = "runs/dail_demo"
    c.seed = 0
    c.model.path = load_toy_dail()

    c.demo.num_problems = 48
    c.demo.num_eval_problems = 64
    c.data.id_field = "id"

    # The toy model's own prompt formats (opdjax.toy.dail_problems); thinking off, as it was trained.
    c.prompts.student = dail_problems.TOY_STUDENT
    c.prompts.expert = dail_problems.TOY_EXPERT
    c.prompts.hint = dail_problems.TOY_HINT
    c.prompts.enable_thinking = False
    c.data.max_prompt_tokens = 256
    c.hint.text = dail_problems.TOY_HINT_TEXT
    c.hint.text_no_landmarks = dail_problems.TOY_HINT_TEXT_NO_LANDMARKS
    c.hint.order = "appearance"  # the toy model was trained on hints in the solution's order

    c.rollout.max_new_tokens = 96
    c.synthesis.accept_threshold = 0.8  # the authors' tau for a non-reasoning recipe (the per-recipe default)
    c.synthesis.top_n = 20
    c.synthesis.retries = 5
    c.synthesis.num_samples = 8
    c.synthesis.problems_per_batch = 8  # x num_samples rows per jitted call

    c.train.gamma = 0.1
    c.train.epochs = 3
    c.batch.sequences_per_step = 16
    c.loss.chunk_tokens = 128
    c.lora.rank = 8
    c.lora.alpha = 16.0
    c.optimizer.learning_rate = 2e-4  # the authors' recipe (a 10x larger rate did worse on this toy)
    c.optimizer.warmup_steps = 2

    c.eval.samples = 16
    c.eval.temperature = 0.6
    c.eval.top_p = 0.95
    c.eval.budgets = (96,)
    c.eval.forced_answer = " The answer is"
    c.eval.answer_tokens = 6

    c.checkpoint.every = 0
    c.metrics.tensorboard = False
    return c
