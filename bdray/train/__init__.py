from bdray.train.loop import finetune_copy, fit, predict_proba
from bdray.train.recipe import Augment, TrainRecipe

__all__ = ["Augment", "TrainRecipe", "finetune_copy", "fit", "predict_proba"]
