"""Evaluation harness: perplexity, memory, throughput and recall by context length."""
