"""Flower apps for Ember's benchmarks (numpy only)."""
