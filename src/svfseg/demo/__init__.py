"""`svfseg demo`: synthetic-5i end to end on the CPU: a compare of frozen, SVF and full fine-tuning, then
test-time adaptation of the kept SVF checkpoint on each episode's supports.

``run`` holds the plan and the stages, ``adaptation`` the adaptation stage (its table and verdicts).
"""
from svfseg.demo.run import (DEMO_MARKER, FULL, KEPT, QUICK, REGIMES, DemoPlan, _stable_checkpoint,
                             add_demo_arguments, compare_plan, plan_overrides, recipe_path, run_demo, run_demo_cli)

__all__ = ["DEMO_MARKER", "FULL", "KEPT", "QUICK", "REGIMES", "DemoPlan", "_stable_checkpoint", "add_demo_arguments",
           "compare_plan", "plan_overrides", "recipe_path", "run_demo", "run_demo_cli"]
