"""Honest evaluation: simulated clicks, Dice after every click, NoC, latency; a classic baseline; the published
protocol as a flagged legacy mode."""
