"""Training: stage 1 (prompt mapper), stage 2 (generator adaptation), losses, run directories."""
