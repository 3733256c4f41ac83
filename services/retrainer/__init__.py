"""retrainer: drift, a schedule (or a command) -> a reproducible retrain job -> a challenger
registered with its lineage and put in shadow if governance allows (:mod:`myelin.retraining`).
"""
