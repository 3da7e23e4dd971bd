"""Per-token diagnosis arrays with a known answer: sentence-level margins with an optional
planted downward (or upward) shift at a known sentence, encoded so that every margin variant
sees it. Two candidates per token: teacher log-probs (g_t, 0) and student log-probs (0, 0), so
a_t = (g_t, 0) and advantage_gap = teacher_gap = g_t (g_t > 0)."""
import numpy as np


def sentence_margins(n, J, *, shift_at=None, shift=2.0, noise=1.0, seed=0, base=4.0):
    rng = np.random.default_rng(seed)
    m = base + noise * rng.normal(size=(n, J))
    if shift_at is not None:
        m[:, shift_at:] -= shift
    return np.clip(m, 0.05, None)


def arrays_from_margins(sentence_level, tokens_per_sentence=5, *, token_noise=0.2, seed=0, correct=None):
    rng = np.random.default_rng(seed + 1)
    n, J = sentence_level.shape
    R = J * tokens_per_sentence
    g = np.clip(sentence_level.repeat(tokens_per_sentence, 1) + token_noise * rng.normal(size=(n, R)), 0.01, None)
    teacher = np.stack([g, np.zeros_like(g)], -1).astype(np.float32)
    student = np.zeros_like(teacher)
    out = dict(response_ids=np.full((n, R), 5, np.int32), response_mask=np.ones((n, R), bool),
               teacher_sampled_logp=teacher[..., 0].copy(), student_sampled_logp=student[..., 0].copy(),
               teacher_cand_logp=teacher, student_cand_logp=student,
               candidate_ids=np.tile(np.array([5, 6], np.int32), (n, R, 1)),
               sent_ids=np.tile(np.arange(J, dtype=np.int32).repeat(tokens_per_sentence), (n, 1)))
    if correct is not None:
        out["correct"] = np.asarray(correct, np.int8)
    return out
