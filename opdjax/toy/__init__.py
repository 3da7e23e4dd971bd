"""The embedded toy world of the demos and tests: the arithmetic task (arithmetic), random
checkpoints (checkpoints), the OPD teacher/student pair (opd_pair), DAIL's model M (dail_model) and
its problems with terse expert solutions (dail_problems)."""
