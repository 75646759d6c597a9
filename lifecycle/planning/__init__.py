"""Planning: from a snapshot of the catalogue and the policy to a Plan, changing nothing.

Owns the catalogue snapshot (snapshot), the policy (policy), the actions (actions), the
planners (planner: replicate and migrate; expire; rebalance), the Plan and its batches (plan,
batching) and `make_plan` for each pipeline (pipelines). Planners are pure: no I/O.

May import the foundation and lifecycle.catalogue (to read the snapshot).
"""
