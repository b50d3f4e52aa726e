"""Embedding distillation's pieces that know models but no engine: the frozen teacher
(:class:`Teacher`), the on-disk cache of its embeddings (:class:`EmbeddingCache`) and the
teacher's rows of a contrastive batch (:func:`embed_batch`)."""

from .embedding_cache import EmbeddingCache, text_key
from .teacher import Teacher, check_teacher_folder, teacher_digest
from .teacher_rows import embed_batch

__all__ = ["EmbeddingCache", "embed_batch", "Teacher", "check_teacher_folder", "teacher_digest", "text_key"]
