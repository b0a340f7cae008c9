"""Series: when a received series is complete, whether it is a CTPA, and the one place that writes its state."""
