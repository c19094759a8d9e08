"""Evaluation of generated images: a detector and exact scores for the synthetic shapes data set."""
