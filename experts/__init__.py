"""The model: configs, checkpoint loading, model families, attention and MoE layers, the KV cache."""
