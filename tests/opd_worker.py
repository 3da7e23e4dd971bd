"""Run one OPD job from a JSON config in this process (the resume / SIGTERM tests start it as a
subprocess so that it can be killed). Usage: python tests/opd_worker.py config.json"""
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ml_collections  # noqa: E402


def main(path):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    with open(path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    from opdjax.train import opd
    s = opd.run(config)
    print("DONE preempted=%s final_step=%d" % (s["preempted"], s["final_step"]), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
