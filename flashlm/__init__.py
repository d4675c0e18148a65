"""FlashLM: compact, efficient transformer language models."""
