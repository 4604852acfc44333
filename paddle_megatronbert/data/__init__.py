"""Datasets and feature builders: pretraining shards, SQuAD and GLUE."""
