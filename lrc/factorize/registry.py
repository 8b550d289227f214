"""The registry of factorization methods, by name."""

from __future__ import annotations

from ..registry import Registry
from .base import FactorizationMethod

METHODS: Registry[FactorizationMethod] = Registry("method")
