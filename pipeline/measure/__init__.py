"""Measurement primitives: one way to time, one way to sample memory."""
