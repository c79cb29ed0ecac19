"""The gateway's routers, one per resource."""

from service.routes import datasets, health, jobs, models, reconstruct

ROUTERS = (health.router, jobs.router, models.router, datasets.router, reconstruct.router)

__all__ = ["ROUTERS"]
