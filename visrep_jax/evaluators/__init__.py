"""Evaluators: classification now; kNN, linear probe, few-shot episodes later."""
