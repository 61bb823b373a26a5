"""Task sources: where prompts, references and SFT demonstrations come from (see `base.py`)."""

from engine.tasks.base import (
    ArithmeticConfig,
    FileConfig,
    TaskConfig,
    TaskSource,
    load_task_source,
)
from verifiers.base import Task

__all__ = ["ArithmeticConfig", "FileConfig", "Task", "TaskConfig", "TaskSource", "load_task_source"]
