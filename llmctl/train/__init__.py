"""Training: `trainer.Trainer(run).fit()` / `trainer.train(run)` and its parts.

checkpoint (folders, safe loading) · optim (AdamW groups, LR schedule) · precision (device,
autocast, grad scaler) · distributed (torchrun environment, collectives, --nproc launcher) ·
parallel (single / DDP / FSDP2) · data (the dataset as the trainer sees it) · prefetch ·
metrics (metrics.jsonl, console) · wandb_run · plot · state (RNG) · signals · run_folder.
Submodules import torch; this package itself does not.
"""
