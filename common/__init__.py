"""Ground helpers that import nothing else of the project: errors, atomic files, devices, torch.distributed,
checkpoint files and loading named Hugging Face models."""
