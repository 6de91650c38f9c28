"""The ``search`` CLI, study config, driver, workers, report and dashboard."""
