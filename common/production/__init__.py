"""Production stage (06): CPU topology, pinned processes, sweeps, cold start, recommendation, segment mode."""
