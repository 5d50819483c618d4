from bdray.defenses import badexpert  # noqa: F401  (registers the defenses)
from bdray.defenses.badexpert import BaDExpert, BaDExpertConfig, eq3_score
from bdray.defenses.base import DEFENSES, DefenseConfig, Detector, defense_class, list_defenses, register_defense

__all__ = [
    "DEFENSES",
    "BaDExpert",
    "BaDExpertConfig",
    "DefenseConfig",
    "Detector",
    "defense_class",
    "eq3_score",
    "list_defenses",
    "register_defense",
]
