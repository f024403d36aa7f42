"""Calibration: channel statistics of communicated values, and their on-disk artifact."""
from lowbit_tp.calibration.artifact import (
    SCHEMA_VERSION,
    Calibration,
    CalibrationError,
    ChannelStats,
    StatsAccumulator,
    default_outlier_k,
)

__all__ = ["SCHEMA_VERSION", "Calibration", "CalibrationError", "ChannelStats", "StatsAccumulator", "default_outlier_k"]
