"""Training: optimizer and schedules, the loop, metrics."""
