"""Measurements shared by training, evaluation and analysis: the gold reply's log-probability, and greedy
replies scored by the task. Written once here and asked for everywhere."""
