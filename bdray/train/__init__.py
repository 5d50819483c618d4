from bdray.train.loop import finetune_copy, fit, predict_proba
from bdray.train.recipe import Augment, TrainRecipe

# bdray.train.distributed (Ray Train) is imported on use: it pulls in Ray.

__all__ = ["Augment", "TrainRecipe", "finetune_copy", "fit", "predict_proba"]
