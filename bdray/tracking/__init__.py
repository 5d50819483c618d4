from bdray.tracking.mlflow import RunLogger, Tracker, flatten, git_commit

__all__ = ["RunLogger", "Tracker", "flatten", "git_commit"]
