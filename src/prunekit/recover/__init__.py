"""Recovery after pruning. For now a short full fine-tune that keeps pruned weights at zero;
LoRA, continued pretraining and distillation come with the recovery issue."""

from prunekit.recover.finetune import FinetuneConfig, FinetuneReport, finetune, mask_optimizer_state

__all__ = ["FinetuneConfig", "FinetuneReport", "finetune", "mask_optimizer_state"]
