"""OpenAcct's Celery workers: charger, refunder, reporter."""
