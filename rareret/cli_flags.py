"""Flags shared by the command-line tools (`rareret`, `rareret-grid`, `rareret-experiments`):
absl allows one definition per process, and a test process imports them all."""

from absl import flags

DRY_RUN = flags.DEFINE_bool("dry_run", False, "check the inputs and say what would run; run "
                                              "nothing and write nothing.")
