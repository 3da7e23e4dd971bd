"""TRL's side of bench_vs_trl.py: Hugging Face TRL's on-policy GKDTrainer, timed step by step.

Runs in the SEPARATE TRL venv (never in opdjax's .venv; see bench_vs_trl.py for its set-up):

    /work/bench_trl_venv/bin/python bench/trl_gkd_side.py --spec spec.json --out trl.json

spec.json (written by bench_vs_trl.py): student/teacher HF checkpoint dirs, the exact prompt token
rows of every step (the same rows opdjax sampled from, left-padded to the same width with the
same pad id), max_new_tokens, beta, learning rate, steps, warm-up steps, threads.

What one GKD step does (trl/experimental/gkd/gkd_trainer.py, TRL 1.16.0), with lmbda = 1:
  1. `generate_on_policy_outputs`: student `model.generate(do_sample=True, temperature, top_k=0,
     top_p=1, max_new_tokens, use_cache=True)` on the prompts; completion masked after the first EOS;
  2. `compute_loss`: student forward (with grad) and teacher forward (no_grad) on prompt+completion,
     full [B, T, V] logits, `generalized_jsd_loss(beta)` over the completion tokens;
  3. backward, gradient clipping, AdamW step (transformers.Trainer.training_step + the loop).
We run `trainer.train()` for warmup + steps steps with a callback recording the wall time at each
step's end: a step's time is the interval between consecutive step ends (so it includes data
loading and every bit of the loop's per-step overhead, as a real run pays it; with wait_quiet the
untimed wait for an idle machine after each step end is taken out). Generation and
compute_loss are timed by wrapping those two methods.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    with open(args.spec) as f:
        spec = json.load(f)

    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from bench_forward import _busy_cpu_seconds, _other_busy_cores, _wait_quiet

    threads = int(spec.get("threads") or os.cpu_count())
    torch.set_num_threads(threads)
    torch.manual_seed(int(spec.get("seed", 0)))
    rows_per_step = spec["rows"]  # [steps][B][ids]
    P, pad = int(spec["prompt_len"]), int(spec["pad_id"])
    n_steps = len(rows_per_step)

    tok = AutoTokenizer.from_pretrained(spec["student"], local_files_only=True)
    student = AutoModelForCausalLM.from_pretrained(spec["student"], dtype=torch.float32,
                                                   attn_implementation=spec.get("attn", "sdpa"))
    teacher = AutoModelForCausalLM.from_pretrained(spec["teacher"], dtype=torch.float32,
                                                   attn_implementation=spec.get("attn", "sdpa"))

    def collate(examples):
        assert len(examples) == 1
        rows = rows_per_step[int(examples[0]["step"])]
        ids = torch.full((len(rows), P), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), P), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, P - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, P - len(r):] = 1
        labels = ids.masked_fill(mask == 0, -100)  # replaced by the on-policy labels (lmbda = 1)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels,
                "prompts": ids.clone(), "prompt_attention_mask": mask.clone()}

    ds = Dataset.from_dict({"step": list(range(n_steps))})
    out_dir = tempfile.mkdtemp(prefix="trl_gkd_")
    cfg = GKDConfig(
        output_dir=out_dir, per_device_train_batch_size=1, gradient_accumulation_steps=1, max_steps=n_steps,
        learning_rate=float(spec["learning_rate"]), lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=float(spec.get("grad_clip", 1.0)), logging_strategy="no",
        save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=int(spec.get("seed", 0)),
        dataloader_num_workers=0, bf16=False, fp16=False, gradient_checkpointing=False,
        lmbda=1.0, beta=float(spec["beta"]), temperature=float(spec.get("temperature", 1.0)),
        max_new_tokens=int(spec["max_new_tokens"]), remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
    )

    gen_times, loss_times, gen_tokens, gen_cols = [], [], [], []
    orig_gen = GKDTrainer.generate_on_policy_outputs
    orig_loss = GKDTrainer.compute_loss

    def timed_gen(model, inputs, generation_config):
        t = time.perf_counter()
        out = orig_gen(model, inputs, generation_config)
        gen_times.append(time.perf_counter() - t)
        new_ids, new_mask, new_labels = out
        gen_tokens.append(int((new_labels != -100).sum()))
        gen_cols.append(int(new_ids.shape[1] - P))
        return out

    def timed_loss(self, *a, **kw):
        t = time.perf_counter()
        out = orig_loss(self, *a, **kw)
        loss_times.append(time.perf_counter() - t)
        return out

    GKDTrainer.generate_on_policy_outputs = staticmethod(timed_gen)
    GKDTrainer.compute_loss = timed_loss

    ends, resumes, loads = [], [], []
    wait = float(spec.get("wait_quiet", 0.0))

    class Timer(TrainerCallback):
        # a step's time = its end - the previous step's end (or train start), less the untimed
        # wait for a quiet machine done right after each step end
        def _resume(self):
            if wait > 0:
                _wait_quiet(wait)
            resumes.append(time.perf_counter())
            self._m = (_busy_cpu_seconds(), time.process_time(), time.perf_counter())

        def on_train_begin(self, a, state, control, **kw):
            self._resume()

        def on_step_end(self, a, state, control, **kw):
            ends.append(time.perf_counter())
            loads.append(_other_busy_cores(*self._m))
            self._resume()

    trainer = GKDTrainer(model=student, teacher_model=teacher, args=cfg, train_dataset=ds,
                         processing_class=tok, data_collator=collate, callbacks=[Timer()])
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    step_s = [e - r for r, e in zip(resumes, ends)]
    warm = int(spec.get("warmup", 1))
    timed = slice(warm, None)
    med = lambda xs: statistics.median(xs) if xs else None
    res = {
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
        "threads": threads, "steps": n_steps, "warmup": warm, "total_train_s": total,
        "step_s_all": step_s, "generate_s_all": gen_times, "compute_loss_s_all": loss_times,
        "generated_real_tokens_all": gen_tokens, "generated_columns_all": gen_cols, "other_busy_cores_all": loads,
        "step_s": med(step_s[timed]), "min_step_s": min(step_s[timed]), "generate_s": med(gen_times[timed]),
        "compute_loss_s": med(loss_times[timed]),
        "rest_s": med([s - g - c for s, g, c in zip(step_s[timed], gen_times[timed], loss_times[timed])]),
        "real_tokens_per_step": med(gen_tokens[timed]),
        "rollout_tokens_per_s": med([n / s for n, s in zip(gen_tokens[timed], step_s[timed])]),
        "other_busy_cores_median": med([x for x in loads[timed] if x is not None]),
    }
    quiet = [i for i in range(warm, len(step_s)) if loads[i] is not None and loads[i] < 0.1]
    res["quiet_steps"] = len(quiet)
    res["quiet_step_s"] = med([step_s[i] for i in quiet])
    res["quiet_generate_s"] = med([gen_times[i] for i in quiet])
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    print(f"TRL GKD: median step {res['step_s']:.3f} s (generate {res['generate_s']:.3f}, compute_loss "
          f"{res['compute_loss_s']:.3f}, backward+optimizer+loop {res['rest_s']:.3f}); steps {step_s}", flush=True)


if __name__ == "__main__":
    main()
