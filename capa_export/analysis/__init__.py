"""Analysis of a model: sinks, attention vs contribution, FFN linearity, suggested settings."""

from .report import AnalysisSettings, analyze, format_table

__all__ = ["AnalysisSettings", "analyze", "format_table"]
