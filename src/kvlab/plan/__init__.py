"""The fleet planner (`kvlab plan`): GPUs, HBM and dollars for N agents, from the simulator."""
