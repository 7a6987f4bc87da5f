"""Offline teacher: run the teacher once (`dwakd teacher-cache`), then train any method from the cache without it.

See docs/teacher-cache.md. `build_teacher_cache` writes a cache; `TeacherCache` reads one; with `teacher.cache: DIR`
in a run config, `dwakd.run` checks the cache's fingerprint, builds a `CachedTeacher` (embedding table, LM head and
config only) instead of the teacher, and the collator adds each batch's cached rows.
"""

from dwakd.teacher_cache.builder import CacheSettings, build_teacher_cache, verify_cache
from dwakd.teacher_cache.format import TeacherCacheError
from dwakd.teacher_cache.reader import TeacherCache, TeacherCacheCollator, example_key
from dwakd.teacher_cache.view import CachedModelView, CachedTeacher, cache_refusal, topk_to_logits

__all__ = [
    "CacheSettings",
    "CachedModelView",
    "CachedTeacher",
    "TeacherCache",
    "TeacherCacheCollator",
    "TeacherCacheError",
    "build_teacher_cache",
    "cache_refusal",
    "example_key",
    "topk_to_logits",
    "verify_cache",
]
