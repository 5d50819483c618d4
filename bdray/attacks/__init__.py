from bdray.attacks import patch  # noqa: F401  (registers the attacks)
from bdray.attacks.base import (
    ATTACKS,
    Attack,
    AttackConfig,
    PoisonedSet,
    PoisonPlan,
    apply_plan,
    apply_poison,
    attack_class,
    build_attack,
    list_attacks,
    poison_dataset,
    register_attack,
    triggered_testset,
)

__all__ = [
    "ATTACKS",
    "Attack",
    "AttackConfig",
    "PoisonPlan",
    "PoisonedSet",
    "apply_plan",
    "apply_poison",
    "attack_class",
    "build_attack",
    "list_attacks",
    "poison_dataset",
    "register_attack",
    "triggered_testset",
]
