"""Experiments: studies that fit and test many runs to answer one question, each writing a report."""
