"""Recovery after pruning: LoRA, continued pretraining, CPT then LoRA, and distillation (``train``), on
packed text or Alpaca instructions (``data``); and the short masked fine-tune of prune–retrain (``finetune``)."""

from prunekit.recover.data import TrainData, load_train_data
from prunekit.recover.finetune import FinetuneConfig, FinetuneReport, finetune, mask_optimizer_state, sparse_masks
from prunekit.recover.teacher import TeacherTopK, precompute_teacher_topk
from prunekit.recover.train import LoraSettings, RecoverConfig, RecoverReport, recover

__all__ = [
    "FinetuneConfig",
    "FinetuneReport",
    "LoraSettings",
    "RecoverConfig",
    "RecoverReport",
    "TeacherTopK",
    "TrainData",
    "finetune",
    "load_train_data",
    "mask_optimizer_state",
    "precompute_teacher_topk",
    "recover",
    "sparse_masks",
]
