"""Embedding distillation's pieces that know models but no engine: the frozen teacher
(:class:`Teacher`) and the on-disk cache of its embeddings (:class:`EmbeddingCache`)."""

from .cache import EmbeddingCache, text_key
from .teacher import Teacher, check_teacher_folder, teacher_digest

__all__ = ["EmbeddingCache", "Teacher", "check_teacher_folder", "teacher_digest", "text_key"]
