"""Planning glue and the hardware profile: the planner's problem from an engine, `offload profile` and its probes."""
