"""Metrics: JSONL round trip (NaN -> null), resume truncation, TensorBoard events read back with
tensorboardX's protobufs, the progress line, and learning-curve PNGs."""
import glob
import io
import json
import math
import os
import struct

import numpy as np
import pytest

from opdjax.train.metrics import MetricsWriter, Progress, namespaced, plot_curves, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def read_tb_events(logdir):
    """All events in a TensorBoard log dir: TFRecord framing (u64 length, u32 crc, data, u32 crc)
    parsed by hand, payloads decoded with the Event proto tensorboardX ships."""
    from tensorboardX.proto import event_pb2

    events = []
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data = f.read()
        pos = 0
        while pos + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            payload = data[pos + 12:pos + 12 + n]
            pos += 12 + n + 4
            ev = event_pb2.Event()
            ev.ParseFromString(payload)
            events.append(ev)
    return events


def tb_scalars(logdir):
    out = {}
    for ev in read_tb_events(logdir):
        for v in ev.summary.value:
            if v.HasField("simple_value"):
                out.setdefault(v.tag, []).append((ev.step, v.simple_value))
    return out


def test_namespaced():
    assert namespaced("loss", {"pg": 1, "kl": 2.5}) == {"loss/pg": 1, "loss/kl": 2.5}
    assert namespaced("perf/", {"tokens_per_s": 3}) == {"perf/tokens_per_s": 3}
    assert namespaced("", {"a": 1}) == {"a": 1}


def test_jsonl_round_trip_with_non_finite_values(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        w.write(1, {"loss/pg": 0.5, "release/rate": np.float32(0.25), "perf/tokens": np.int64(1024),
                    "bad/nan": float("nan"), "bad/inf": np.inf, "ok/flag": True})
        w.write(2, namespaced("loss", {"pg": 0.4}))
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    for line in lines:
        json.loads(line)  # strict JSON: no NaN/Infinity tokens
    assert "NaN" not in lines[0] and "Infinity" not in lines[0]
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2]
    r = recs[0]
    assert r["loss/pg"] == 0.5 and r["release/rate"] == 0.25 and r["perf/tokens"] == 1024
    assert isinstance(r["perf/tokens"], int)
    assert r["bad/nan"] is None and r["bad/inf"] is None and r["ok/flag"] is True
    assert read_metrics(tmp_path) == recs  # a workdir works too
    with pytest.raises(ValueError, match="reserved"):
        MetricsWriter(tmp_path / "x", tensorboard=False).write(1, {"step": 3})


def test_resume_truncates_later_records(tmp_path):
    w = MetricsWriter(tmp_path, tensorboard=False)
    for s in range(1, 11):
        w.write(s, {"loss/pg": 1.0 / s})
        w.write_text(s, "sample", f"trajectory {s}")
    w.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "loss/p')  # a partial line from a killed run
    w = MetricsWriter(tmp_path, tensorboard=False, resume_step=6)
    for s in range(7, 9):
        w.write(s, {"loss/pg": -1.0})
    w.close()
    recs = read_metrics(tmp_path)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert recs[6]["loss/pg"] == -1.0
    texts = [json.loads(x) for x in (tmp_path / "text.jsonl").read_text().splitlines()]
    assert [t["step"] for t in texts] == [1, 2, 3, 4, 5, 6]


def test_tensorboard_events_contain_scalars_and_text(tmp_path):
    w = MetricsWriter(tmp_path, tensorboard=True)
    w.write(3, {"loss/pg": 0.75, "release/rate": float("nan")})
    w.write(4, {"loss/pg": 0.5})
    w.write_text(4, "samples/trajectory", "First, 3 + 4 = 7. So the answer is 7.")
    w.close()
    tb = tmp_path / "tb"
    assert glob.glob(str(tb / "events.out.tfevents.*"))
    scalars = tb_scalars(str(tb))
    assert scalars["loss/pg"] == [(3, 0.75), (4, 0.5)]
    assert "release/rate" not in scalars  # non-finite: skipped, no crash
    texts = [v for ev in read_tb_events(str(tb)) for v in ev.summary.value if v.tag.startswith("samples/trajectory")]
    assert texts and b"answer is 7" in texts[0].tensor.string_val[0]


def test_tensorboard_resume_purges_later_steps(tmp_path):
    w = MetricsWriter(tmp_path)
    for s in range(1, 6):
        w.write(s, {"loss/pg": float(s)})
    w.close()
    w = MetricsWriter(tmp_path, resume_step=3)
    w.write(4, {"loss/pg": 40.0})
    w.close()
    # TensorBoard drops the old steps >= purge_step when it sees the second file's SessionLog START
    starts = [ev for ev in read_tb_events(str(tmp_path / "tb"))
              if ev.HasField("session_log") and ev.session_log.status == ev.session_log.START]
    assert starts and starts[-1].step == 4


def test_progress_plain_lines_show_rate_and_eta():
    buf = io.StringIO()
    p = Progress(100, start_step=10, stream=buf, min_interval_s=0.0)
    for s in range(11, 16):
        p.update(s, tokens=512, extra={"loss": 0.123456, "release/rate": 0.5})
    p.close()
    out = buf.getvalue()
    lines = out.strip().splitlines()
    assert len(lines) == 5
    assert "step 15/100" in lines[-1]
    assert "tok/s" in out and "ETA" in out and "loss 0.1235" in out and "release/rate 0.5" in out
    r = p.rates()
    assert r["tokens_per_s"] > 0 and r["eta_s"] > 0


def test_progress_throttles_when_not_a_tty():
    buf = io.StringIO()
    p = Progress(1000, stream=buf, min_interval_s=3600.0)
    for s in range(1, 50):
        p.update(s, tokens=10)
    assert len(buf.getvalue().splitlines()) == 1  # only the first line within the interval
    p.close()
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2 and "step 49/1000" in lines[-1]  # close prints the final state
    q = Progress(5, stream=io.StringIO(), enabled=False)
    q.update(1, tokens=3)
    q.close()
    assert q.stream.getvalue() == ""


def test_plot_curves_writes_png(tmp_path):
    a = [{"step": s, "loss/pg": 1 / s, "release/rate": 0.5 + 0.01 * s} for s in range(1, 21)]
    b = [{"step": s, "loss/pg": 1.2 / s if s != 5 else None} for s in range(1, 21)]
    out = plot_curves({"release": a, "full": b}, ["loss/pg", "release/rate", "missing/key"],
                      tmp_path / "curves" / "c.png", title="demo")
    data = open(out, "rb").read()
    assert data[:8] == PNG_MAGIC and len(data) > 5000
    import matplotlib.image
    img = matplotlib.image.imread(out)
    assert img.shape[0] > 100 and img.std() > 0.01
    assert not math.isnan(img.mean())
