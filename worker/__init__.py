"""Celery workers that turn queued training jobs into stored models.

Start one with `celery -A worker.celery_app worker -Q dae.train` (see worker/celery_app.py); scale by starting
more, on this host or any other that sees the same Redis and model store. Importing this package never
imports TensorFlow: tasks load it inside the pool child, after the fork.
"""
